"""The schema of a target store: its logical arrays, stored parts, codecs and `hdpipe` attributes.

Logical arrays (`ArraySpec`) are indexed [sample, view, *shape_tail] ([sample, *shape_tail] when
`per_view=False`, e.g. `valid` [N]). Every per-view Zarr array is sharded (S, V, *tail) and chunked
one view per chunk (1, 1, *tail) when a view holds >= VIEW_CHUNK_BYTES, one sample per chunk
(1, V, *tail) otherwise (per-sample arrays:
chunk = shard = (S, *tail)), so Zarr shard k holds rows [k*S, k*S + count_k) exactly like tar shard k.

Precision (per array; `pipeline.targets.quant` has the formulas and bounds):
- `exact`: stored as its dtype (ints, bools, float32 crop boxes);
- `fp16` / `int8` / `q1pct`: float targets, stored as parts: `<name>` holds part "q" and
  `<name>_<part>` the others (`relations_scale` float16 [N, V, ..., rows] for int8;
  `<name>_step` float32 [N, V] + integer predictors + uint16 residual codes for q1pct, whose parts
  `pipeline.targets.compact.part_specs` lists; the store attribute `q1pct_codec` versions them).
- store-level parts, kept once: `<name>_channel_basis` int16 [D, k] for a q1pct array with
  `channel_basis` (fitted on shard 0 by its writer, before any other shard may be written; its
  Zarr attribute `hdpipe.fitted` turns true, with the sha256 `digest` of its bytes, after the data).
Codecs: Blosc byte shuffle (element size = itemsize) then lz4 for fp16/int8 targets (decode speed
first), zstd level 1 with 64 KiB blocks for q1pct's integer codes (bytes first), zstd level 3 for
exact arrays, then a crc32c of the compressed bytes, per chunk (Zarr v3 core codecs; `codecs`).
With the shard index's own crc32c (Zarr's default) every byte of a shard file is checksummed, and
Zarr (or stage two's `shard_reader`) checks it on every read; the done marker adds each file's
length, which catches a missing or truncated file (Zarr would read a missing one as fill values).
Arrays of image patches (`pixels`: the student's uint8 views) are compressed as their store's
targets, without shuffle (`pixel_compression`, `PIXEL_CODECS`): lz4 in fp16/int8 stores, zstd level
1 in q1pct ones.

The `hdpipe` group attribute holds the caller's settings (`REQUIRED_ATTRS` must be present) plus
what the store adds itself (`STORE_ATTRS`): schema version, manifest digest, counts, each array's
spec, the codec and the package version (`full_attrs`).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
from typing import Any, Mapping

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline import __version__
from pipeline.errors import StoreError, require_finite
from pipeline.targets import quant

# Bump when the layout or attribute meaning changes; open() refuses others. 2: crc32c per chunk and
# file lengths in done markers (version 1 stores cannot be checked, so they are rebuilt).
SCHEMA_VERSION = 2
# zstd level of exact chunks (its default): as small as at 5 within a few %, writes 2-3x faster
ZSTD_LEVEL = 3
# q1pct codes at zstd level 1 in Blosc blocks of 64 KiB. Measured on ViT-B stores (random-init
# teachers, 2 views per row; benchmarks/bench_host.py's stores): relations 97.3 KB per row at level 1,
# 104.0 at 3, 93.1 at 7, but level 7 encoded in 13.9 ms per row against 0.83 (level 1) and decoded
# slower (0.41 vs 0.30 ms); features 58.6 KB at level 1, 58.7 at 7, encoded in 0.21 vs 2.90 ms. Level 7
# had been chosen for 6% fewer bytes than 3; level 1 is within 4.5% of it for 1/17 of the host time
# extraction spends per view. Blocks of 64 KiB (vs Blosc's default for the chunk) save 2-3%.
COMPACT_ZSTD_LEVEL = 1
COMPACT_BLOCK_BYTES = 65536
# A per-view part whose one view holds at least this many bytes is chunked per view, smaller ones a
# row (all views) per chunk. Stage two shows one view of a row per epoch: with a row per chunk it
# decompressed all V views of every target to keep one (fp16 ViT-B row + pixels read in 0.18 vs
# 0.20 ms, q1pct 0.36 vs 0.50). The small parts (views, masks) stay a row per chunk: Zarr reads them
# whole (the discriminative extraction's views and masks), at a cost per chunk. q1pct's codes too,
# at any view count: a row per chunk kept them 0.3% smaller at 2 views (bench_precision: 99.8 against
# 100.1 KB per view), but stage two then ran zstd over both views to show one, its largest host cost
# (ViT-B q1pct MIM + disc rows at 2 views: 0.64 ms per image in Blosc); at 10 views a row per chunk
# decompressed all 10 (ViT-B relations: 1.97 against 0.59 ms per row, +0.6% bytes).
VIEW_CHUNK_BYTES = 4096
# The student's pixels (uint8 patches of rendered views, lossless), no shuffle, compressed as their
# store's targets are. Measured on rendered 224 px views of photos (67 patches, 2 views per row):
# numcodecs' delta filter before zstd made them 18% smaller (54 vs 66 KB per row) but its decode (a
# cumulative sum) took 0.32 ms per row against 0.08: stage two reads every row every epoch, so no
# filter. Per view of bench_host's ViT-B stores (51 KB raw): zstd 3 33.5 KB, encoded in 0.39 ms and
# decoded in 0.069; zstd 1 34.5 KB in 0.116 / 0.055; lz4 38.4 KB in 0.029 / 0.012. zstd 3 had cost
# a third of the extraction host work per view (issue 19's goal: <= 1 ms): fp16 and int8 stores put
# decode speed first (lz4, 1.5% more bytes per fp16 view), q1pct stores bytes first (zstd 1, 1% more
# bytes per q1pct view than zstd 3).
PIXEL_CODECS = {"fast": "blosc lz4 level 5, no shuffle", "compact": "blosc zstd level 1, no shuffle"}
# lz4 level of fp16 / int8 parts (`codecs`, "fast")
LZ4_LEVEL = 5
# Version of the q1pct encoder, and so of its parts: 2 added the token subspace and channel basis
# predictors; 3 sums in one fixed order (`exact.tree_sum`), so numpy and torch on any device store the
# same bytes. 3's parts are 2's, decoded the same way: stores of either are read; only 3 is written.
Q1PCT_CODEC = 3
Q1PCT_READS = (2, 3)
# Settings the caller must give: without them a store cannot be checked against its consumers.
REQUIRED_ATTRS = ("teacher", "weights_digest", "preprocessing", "precision", "tokens", "view_plan_digest")
# Added by the store itself; a caller may pass them only with the same value.
STORE_ATTRS = ("schema_version", "manifest_digest", "total", "shard_size", "num_shards", "views",
               "arrays", "codec", "package_version")


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One logical array of a store."""

    shape_tail: tuple[int, ...]  # shape after [sample, view] (after [sample] if not per_view)
    dtype: str = "float32"  # dtype written and read: float32 for lossy precisions, else as stored
    precision: str = quant.LOSSLESS  # "exact" or a name in quant.CODECS (float32 arrays only)
    per_view: bool = True  # False: indexed [sample, *shape_tail] (e.g. `valid` [N])
    channel_basis: bool = False  # q1pct: predict rows [.., T, D] from a channel subspace fitted on shard 0, stored once
    pixels: bool = False  # uint8 image patches (the student's pixels): compressed by `pixel_compression`

    def to_json(self) -> dict:
        out = {"shape_tail": [int(s) for s in self.shape_tail], "dtype": str(np.dtype(self.dtype)),
               "precision": self.precision, "per_view": bool(self.per_view)}
        if self.uses_channel_basis:  # absent otherwise: stores of other precisions keep their attributes
            out["channel_basis"] = True
        if self.pixels:  # likewise: stores made before pixels existed keep their attributes
            out["pixels"] = True
        return out

    @staticmethod
    def from_json(d: Mapping) -> "ArraySpec":
        return ArraySpec(tuple(int(s) for s in d["shape_tail"]), d["dtype"], d["precision"], bool(d["per_view"]),
                         bool(d.get("channel_basis", False)), bool(d.get("pixels", False)))

    @property
    def uses_channel_basis(self) -> bool:
        """Only q1pct predicts from a channel basis; fp16 and int8 ignore the request."""
        return self.channel_basis and self.precision == "q1pct"


def jsonable(v: Any) -> Any:
    """Tuples to lists, numpy scalars to Python: the form the value has after a JSON round trip."""
    return json.loads(json.dumps(v, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def diff(stored: Any, expected: Any, prefix: str) -> list[str]:
    """Human-readable differences, nested dicts reported by dotted key."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(stored) | set(expected), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                out.append(f"{name}: missing in store, expected {expected[key]!r}")
            elif key not in expected:
                out.append(f"{name}: stored {stored[key]!r}, expected it absent")
            else:
                out.extend(diff(stored[key], expected[key], name))
        return out
    return [] if stored == expected else [f"{prefix}: stored {stored!r}, expected {expected!r}"]


def shard_table(manifest: Any) -> tuple[int, int, list[int], str]:
    """(total, shard_size, count per shard, digest) from a Manifest, checked for Zarr alignment."""
    try:
        total, size, shards = int(manifest.total), int(manifest.shard_size), list(manifest.shards)
        digest = manifest.digest()
    except AttributeError as e:
        raise StoreError("TargetStore.create needs a pipeline.data.manifest.Manifest, "
                         f"got {type(manifest).__name__}: {e}") from None

    def field(s, key):
        return s[key] if isinstance(s, Mapping) else getattr(s, key)

    counts = []
    for k, s in enumerate(shards):
        first, count = int(field(s, "first_index")), int(field(s, "count"))
        if first != k * size or count != min(size, total - k * size) or count <= 0:
            raise StoreError(
                f"manifest shard {k} covers [{first}, {first + count}) but a store needs [{k * size}, "
                f"{min((k + 1) * size, total)}): every shard but the last must hold shard_size={size} "
                "samples; re-make the manifest with `hdpipe shard`"
            )
        counts.append(count)
    if sum(counts) != total:
        raise StoreError(f"manifest shards hold {sum(counts)} samples but total is {total}; "
                         "re-make it with `hdpipe shard`")
    return total, size, counts, str(digest)


def codecs(dtype: np.dtype, compression: str = "zstd") -> list:
    """Blosc, byte shuffle for multi-byte types, then crc32c, all in the Zarr v3 core spec.

    `compression` (`Codec.compression` of the array's precision; "zstd" for exact arrays):
    - "fast" (fp16, int8 targets): lz4. Stage two decompresses every row it reads, every epoch, on
      the host; measured on trained teachers' fp16 relations and features (Fashion-MNIST study) zstd
      3 made them only 7-9% smaller (1.07-1.09x) at 6-10x lz4's decode time (ViT-S relations of 2 views:
      0.22 vs 0.02 ms per row), and lz4 encodes 6x faster at extraction.
    - "compact" (q1pct codes): zstd level 1 and 64 KiB Blosc blocks, each its own zstd frame, so its
      Huffman tables follow the code statistics of a few heads or channels at a time (2x smaller
      than lz4 on these codes).
    - "zstd": zstd level 3 (small exact arrays: views, masks, valid). Student pixels take their
      store's targets' compression, without shuffle (`pixel_compression`).
    Shuffling puts the mostly-zero high bytes of small codes together. The crc32c (4 bytes per
    chunk, ~9 GB/s) makes a flipped byte an error on read instead of a wrong target; it runs first
    when decoding, so damaged bytes never reach Blosc.
    """
    shuffle = "shuffle" if dtype.itemsize > 1 else "noshuffle"
    if compression == "compact":
        blosc = BloscCodec(cname="zstd", clevel=COMPACT_ZSTD_LEVEL, shuffle=shuffle, typesize=dtype.itemsize,
                           blocksize=COMPACT_BLOCK_BYTES)
    elif compression == "fast":
        blosc = BloscCodec(cname="lz4", clevel=LZ4_LEVEL, shuffle=shuffle, typesize=dtype.itemsize)
    else:
        blosc = BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle=shuffle, typesize=dtype.itemsize)
    return [blosc, Crc32cCodec()]


def pixel_compression(store_precision: str) -> str:
    """`codecs` compression of a store's pixel arrays, its targets': "fast" (lz4) where they put
    decode speed first (fp16, int8), "compact" (zstd 1) where they put bytes first (q1pct)."""
    return quant.codec(store_precision).compression


def array_codecs(spec: ArraySpec, dtype: np.dtype, store_precision: str) -> dict:
    """compressors of one stored part (`create_array` keywords) in a store of `store_precision`."""
    if spec.pixels:
        if dtype != np.uint8:
            raise StoreError(f"pixel arrays are uint8, got {dtype}")
        return {"compressors": codecs(dtype, pixel_compression(store_precision))}  # PIXEL_CODECS
    if spec.precision == quant.LOSSLESS:
        return {"compressors": codecs(dtype)}
    return {"compressors": codecs(dtype, quant.codec(spec.precision).compression)}


def full_attrs(attrs: Mapping[str, Any], arrays: Mapping[str, ArraySpec], manifest: Any, views: int) -> dict:
    """The store's `hdpipe` attribute: the caller's settings, checked, plus what the store sets itself."""
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise StoreError(f"store attributes lack required key(s) {missing} (required: {list(REQUIRED_ATTRS)})")
    if not arrays:
        raise StoreError("a target store needs at least one array")
    if int(views) < 1:
        raise StoreError(f"views must be >= 1, got {views}")
    precision = attrs["precision"]
    quant.codec(precision)  # an unknown precision is refused here, naming the registered ones
    for name, spec in arrays.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*", name) or name == "done":
            raise StoreError(f"array name {name!r} is not a valid store array name")
        if spec.precision != quant.LOSSLESS:
            if spec.precision != precision:
                raise StoreError(f"array {name!r} has precision {spec.precision!r} but the store's precision "
                                 f"is {precision!r}")
            if np.dtype(spec.dtype) != np.float32:
                raise StoreError(f"array {name!r}: lossy precision {spec.precision!r} needs dtype float32, "
                                 f"got {spec.dtype}")
            quant.part_specs(spec.shape_tail, spec.precision, spec.uses_channel_basis)  # checks rows exist
    stored = [part_name(n, p) for n, s in arrays.items() for p in list(stored_parts(s)) + list(store_parts(s))]
    clash = sorted({x for x in stored if stored.count(x) > 1})
    if clash:
        raise StoreError(f"array names collide with the stored parts of other arrays: {clash}")
    total, size, counts, digest = shard_table(manifest)
    if precision == "q1pct":  # its parts changed with the codec: older q1pct stores are refused by `open`
        attrs = {**attrs, "q1pct_codec": Q1PCT_CODEC}
    own = {
        "schema_version": SCHEMA_VERSION,
        "manifest_digest": digest,
        "total": total,
        "shard_size": size,
        "num_shards": len(counts),
        "views": int(views),
        "arrays": {n: s.to_json() for n, s in arrays.items()},
        "codec": (f"per-view arrays: shards (S, V, ...), chunks (1, 1, ...) for parts of >= {VIEW_CHUNK_BYTES} "
                  f"bytes per view, else (1, V, ...); "
                  f"per-sample arrays: chunk = shard "
                  f"(S, ...); blosc byte shuffle + lz4 level {LZ4_LEVEL} for fp16/int8 targets, zstd level "
                  f"{COMPACT_ZSTD_LEVEL} with {COMPACT_BLOCK_BYTES // 1024} KiB blocks for q1pct codes, zstd level "
                  f"{ZSTD_LEVEL} for exact arrays; crc32c per chunk"
                  # named only where used: stores without pixel arrays keep their attribute as it was
                  + (f"; pixel arrays: {PIXEL_CODECS[pixel_compression(precision)]}, crc32c per chunk"
                     if any(s.pixels for s in arrays.values()) else "")),
        "package_version": __version__,
    }
    given = jsonable(dict(attrs))
    for key in STORE_ATTRS:
        if key in given and given[key] != jsonable(own[key]):
            raise StoreError(f"store attribute {key!r} is set by the store ({own[key]!r}); "
                             f"the caller passed {given[key]!r}")
    full = jsonable({**given, **own})
    full["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return full


def check_q1pct_codec(attrs: dict, url: str, writing: bool = False) -> None:
    """Refuse a q1pct store whose parts this hdpipe cannot read, or (`writing`) did not encode itself:
    shards of two encoder versions in one store would break its same-bytes promise."""
    if attrs.get("precision") != "q1pct":
        return
    version = attrs.get("q1pct_codec", 1)
    if version not in Q1PCT_READS:
        raise StoreError(f"target store {url} holds q1pct codes of codec version {version!r}; this hdpipe "
                         f"({__version__}) reads version {' or '.join(map(str, Q1PCT_READS))}: re-extract it with "
                         "`hdpipe extract --overwrite`")
    if writing and version != Q1PCT_CODEC:
        raise StoreError(f"target store {url} holds q1pct codes of encoder version {version}; this hdpipe "
                         f"({__version__}) encodes version {Q1PCT_CODEC} (other bytes for the same targets): finish "
                         "the store with the hdpipe that began it, or re-extract it with `hdpipe extract --overwrite`")


def create_arrays(group: zarr.Group, name: str, spec: ArraySpec, full: dict) -> None:
    total, size, views = full["total"], full["shard_size"], full["views"]
    lead = (total, views) if spec.per_view else (total,)
    # Per-sample arrays (`valid`) are a few bytes per sample: one chunk per shard, or a reader of
    # all N flags would decode N one-byte chunks.
    shard_lead = (size, views) if spec.per_view else (size,)
    for part, (tail, dtype) in stored_parts(spec).items():
        dt = np.dtype(dtype)
        chunk_lead = (size,)
        if spec.per_view:
            big = dt.itemsize * int(np.prod(tail, dtype=np.int64)) >= VIEW_CHUNK_BYTES
            chunk_lead = (1, 1) if big else (1, views)
        arr = group.create_array(
            part_name(name, part), shape=lead + tuple(tail), chunks=chunk_lead + tuple(tail),
            shards=shard_lead + tuple(tail), dtype=dt, **array_codecs(spec, dt, full["precision"]),
            fill_value=False if dt == np.bool_ else 0,
        )
        arr.attrs["hdpipe"] = {"array": name, "part": part, "precision": spec.precision}
    for part, (shape, dtype) in store_parts(spec).items():
        # One chunk, written once (by shard 0's writer); "fitted" is set only after its data.
        arr = group.create_array(part_name(name, part), shape=shape, chunks=shape, dtype=np.dtype(dtype),
                                 compressors=codecs(np.dtype(dtype)), fill_value=0)
        arr.attrs["hdpipe"] = {"array": name, "part": part, "precision": spec.precision, "fitted": False}


def stored_parts(spec: ArraySpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """The per-view (per-sample) parts of an array: {part: (shape after [N, V], dtype)}."""
    if spec.precision == quant.LOSSLESS:
        return {"q": (tuple(spec.shape_tail), str(np.dtype(spec.dtype)))}
    return quant.part_specs(spec.shape_tail, spec.precision, spec.uses_channel_basis)


def store_parts(spec: ArraySpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parts an array keeps once for the whole store: {part: (shape, dtype)} (the channel basis)."""
    if not spec.uses_channel_basis:
        return {}
    from pipeline.targets import compact

    D = int(spec.shape_tail[-1])
    return {"channel_basis": ((D, min(compact.CHANNELS, D)), "int16")}


def part_name(name: str, part: str) -> str:
    return name if part == "q" else f"{name}_{part}"


def check_input(spec: ArraySpec, views: int, k: int, name: str, a: np.ndarray, count: int) -> np.ndarray:
    """Shard k's rows of array `name` as the store writes them (float32 for lossy precisions, or its
    parts already encoded, `quant.Encoded`), or StoreError naming what is wrong (shape, dtype, values
    that do not fit, non-finite values)."""
    lead = (count, views) if spec.per_view else (count,)
    want = lead + spec.shape_tail
    if isinstance(a, quant.Encoded):
        expect = {p: (lead + tuple(shape), np.dtype(dtype)) for p, (shape, dtype) in stored_parts(spec).items()}
        got = {p: (tuple(v.shape), v.dtype) for p, v in a.parts.items()}
        if spec.precision == quant.LOSSLESS or got != expect:
            raise StoreError(f"shard {k}: array {name!r} arrives encoded as {got}; the store expects {expect}")
        return a
    a = np.asarray(a)
    if a.shape != want:
        raise StoreError(f"shard {k}: array {name!r} has shape {a.shape}, the store expects {want}")
    if spec.precision != quant.LOSSLESS:
        if not np.issubdtype(a.dtype, np.floating):
            raise StoreError(f"shard {k}: array {name!r} must be floating point, got {a.dtype}")
        a = a.astype(np.float32, copy=False)
    elif a.dtype != np.dtype(spec.dtype):
        cast = a.astype(spec.dtype)
        if not np.array_equal(cast, a):
            raise StoreError(f"shard {k}: array {name!r} has dtype {a.dtype}; its values do not fit the store's "
                             f"{spec.dtype}")
        a = cast
    if np.issubdtype(a.dtype, np.floating):
        require_finite(a, f"shard {k}: array {name!r}", "nothing of this shard was stored")
    return a
