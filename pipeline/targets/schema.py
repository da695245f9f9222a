"""The schema of a target store: its logical arrays, stored parts, codecs and `hdpipe` attributes.

Logical arrays (`ArraySpec`) are indexed [sample, view, *shape_tail] ([sample, *shape_tail] when
`per_view=False`, e.g. `valid` [N]). Every per-view Zarr array is chunked one sample per chunk
(1, V, *tail) and sharded (S, V, *tail) (per-sample arrays: chunk = shard = (S, *tail)), so Zarr
shard k holds rows [k*S, k*S + count_k) exactly like tar shard k.

Precision (per array; `pipeline.targets.quant` has the formulas and bounds):
- `exact`: stored as its dtype (ints, bools, float32 crop boxes);
- `fp16` / `int8` / `q1pct`: float targets, stored as parts: `<name>` holds part "q" and
  `<name>_<part>` the others (`relations_scale` float16 [N, V, ..., rows] for int8;
  `relations_step` float32 [N, V] + `relations_rowmean` / `relations_colmean` uint32 code
  predictors + `relations` uint16 residual codes for q1pct).
Codecs: Blosc byte shuffle (element size = itemsize) then zstd level 3, per chunk (Zarr v3 core codecs).

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
from zarr.codecs import BloscCodec

from pipeline import __version__
from pipeline.errors import StoreError
from pipeline.targets import quant

SCHEMA_VERSION = 1  # bump when the layout or attribute meaning changes; open() refuses others
ZSTD_LEVEL = 3  # zstd level of every chunk (its default): int8/q1pct codes are as small as at 5, fp16 5% bigger, writes 2-3x faster
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
    precision: str = quant.LOSSLESS  # "exact" or one of quant.PRECISIONS (float32 arrays only)
    per_view: bool = True  # False: indexed [sample, *shape_tail] (e.g. `valid` [N])

    def to_json(self) -> dict:
        return {"shape_tail": [int(s) for s in self.shape_tail], "dtype": str(np.dtype(self.dtype)),
                "precision": self.precision, "per_view": bool(self.per_view)}

    @staticmethod
    def from_json(d: Mapping) -> "ArraySpec":
        return ArraySpec(tuple(int(s) for s in d["shape_tail"]), d["dtype"], d["precision"], bool(d["per_view"]))


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
        raise StoreError(f"TargetStore.create needs a pipeline.data.manifest.Manifest, got {type(manifest).__name__}: {e}") from None

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
        raise StoreError(f"manifest shards hold {sum(counts)} samples but total is {total}; re-make it with `hdpipe shard`")
    return total, size, counts, str(digest)


def codecs(dtype: np.dtype) -> list:
    """Blosc: byte shuffle (multi-byte types) then zstd, both in the Zarr v3 core spec.

    Shuffling puts the mostly-zero high bytes of small codes together; zstd's entropy stage then
    codes the low bytes near their entropy. Same size as numcodecs Shuffle + plain zstd (measured).
    """
    shuffle = "shuffle" if dtype.itemsize > 1 else "noshuffle"
    return [BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle=shuffle, typesize=dtype.itemsize)]


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
    if precision not in quant.PRECISIONS:
        raise StoreError(f"unknown precision {precision!r}; choose one of {list(quant.PRECISIONS)}")
    for name, spec in arrays.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*", name) or name == "done":
            raise StoreError(f"array name {name!r} is not a valid store array name")
        if spec.precision != quant.LOSSLESS:
            if spec.precision != precision:
                raise StoreError(f"array {name!r} has precision {spec.precision!r} but the store's precision is {precision!r}")
            if np.dtype(spec.dtype) != np.float32:
                raise StoreError(f"array {name!r}: lossy precision {spec.precision!r} needs dtype float32, got {spec.dtype}")
            quant.part_specs(spec.shape_tail, spec.precision)  # checks rows exist
    stored = [part_name(n, p) for n, s in arrays.items() for p in stored_parts(s)]
    clash = sorted({x for x in stored if stored.count(x) > 1})
    if clash:
        raise StoreError(f"array names collide with the stored parts of other arrays: {clash}")
    total, size, counts, digest = shard_table(manifest)
    own = {
        "schema_version": SCHEMA_VERSION,
        "manifest_digest": digest,
        "total": total,
        "shard_size": size,
        "num_shards": len(counts),
        "views": int(views),
        "arrays": {n: s.to_json() for n, s in arrays.items()},
        "codec": (f"per-view arrays: chunks (1, V, ...), shards (S, V, ...); per-sample arrays: chunk = shard "
                  f"(S, ...); blosc byte shuffle + zstd level {ZSTD_LEVEL}"),
        "package_version": __version__,
    }
    given = jsonable(dict(attrs))
    for key in STORE_ATTRS:
        if key in given and given[key] != jsonable(own[key]):
            raise StoreError(f"store attribute {key!r} is set by the store ({own[key]!r}); the caller passed {given[key]!r}")
    full = jsonable({**given, **own})
    full["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return full


def create_arrays(group: zarr.Group, name: str, spec: ArraySpec, full: dict) -> None:
    total, size, views = full["total"], full["shard_size"], full["views"]
    lead = (total, views) if spec.per_view else (total,)
    # Per-sample arrays (`valid`) are a few bytes per sample: one chunk per shard, or a reader of
    # all N flags would decode N one-byte chunks.
    chunk_lead = (1, views) if spec.per_view else (size,)
    shard_lead = (size, views) if spec.per_view else (size,)
    for part, (tail, dtype) in stored_parts(spec).items():
        dt = np.dtype(dtype)
        arr = group.create_array(
            part_name(name, part), shape=lead + tuple(tail), chunks=chunk_lead + tuple(tail),
            shards=shard_lead + tuple(tail), dtype=dt, compressors=codecs(dt),
            fill_value=False if dt == np.bool_ else 0,
        )
        arr.attrs["hdpipe"] = {"array": name, "part": part, "precision": spec.precision}


def stored_parts(spec: ArraySpec) -> dict[str, tuple[tuple[int, ...], str]]:
    if spec.precision == quant.LOSSLESS:
        return {"q": (tuple(spec.shape_tail), str(np.dtype(spec.dtype)))}
    return quant.part_specs(spec.shape_tail, spec.precision)


def part_name(name: str, part: str) -> str:
    return name if part == "q" else f"{name}_{part}"
