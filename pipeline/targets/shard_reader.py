"""Whole Zarr shard objects read in one request and decoded chunk by chunk, without Zarr's per-chunk
machinery: stage two's read path (`TargetStore.open_shard_views`, `read_shard_views`).

Zarr 3 costs ~0.5 ms of CPU per chunk outside the codecs themselves (its async pipeline, selection
and buffer objects), about as much as decompressing a ViT-B row of fp16 relations; a q1pct target is
six stored parts, so six chunks per row. A loader reads every row of a shard, so here one shard
object is read whole (one `open().read()` locally, one GET on an object store) and its inner chunks
are decoded straight with the codecs the store declared: the shard index (Zarr v3 `sharding_indexed`:
n x (offset, nbytes) uint64 + crc32c), then per chunk crc32c, Blosc, an optional numcodecs delta
filter. Only the chunks of the rows asked for are kept, still compressed (`ShardViews`), and each
is decompressed when its row is used, straight into the row's place in the batch (the loader's
batches live in shared memory, so the trip to the training process copies nothing): a value is
written once on the host between the file and the batch.

Only the codec chains hdpipe writes are decoded here (`plan` says which; anything else is read by
Zarr itself, so an older or foreign store still reads). Every checksum Zarr would check is checked:
a mismatch is the same `ShardDamagedError` a Zarr read gives.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np
from numcodecs import Delta, blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from pipeline.errors import StoreError
from pipeline.targets import integrity
from pipeline.targets.schema import part_name, stored_parts

if TYPE_CHECKING:
    from pipeline.targets.store import TargetStore

BLOCK_BYTES = 32 << 20  # parts Zarr reads: bytes of rows (all their views) read at a time
_EMPTY = 2**64 - 1  # offset and length of a chunk the shard does not hold (read as the fill value)


@dataclass(frozen=True)
class ShardPlan:
    """How to decode one stored part's shard objects (from its Zarr metadata)."""

    dtype: np.dtype  # little-endian element type
    chunk: tuple[int, ...]  # inner chunk shape: (1, V, *tail) or (1, 1, *tail) (chunks per view) per-view parts
    shard: tuple[int, ...]  # shard shape: (S, V, *tail)
    delta: Delta | None  # numcodecs delta filter before the bytes codec (student pixels), or None
    fill: object  # fill value of chunks the shard does not hold
    index_at_end: bool
    blosc: tuple[bytes, int, int, int, int]  # (cname, clevel, shuffle, blocksize, typesize): the writer's settings


def plan(arr) -> ShardPlan | None:
    """The decoding plan of a Zarr array hdpipe wrote, or None when its codecs are not the chain
    this reader knows (sharding of [(delta), bytes, blosc, crc32c] chunks, index [bytes, crc32c])."""
    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner = list(sharding.codecs)
    delta = None
    if inner and getattr(inner[0], "codec_name", None) == "numcodecs.delta":
        delta = Delta(dtype=inner.pop(0).codec_config["dtype"])
    kinds = [type(c) for c in inner]
    if kinds != [BytesCodec, BloscCodec, Crc32cCodec]:
        return None
    if [type(c) for c in sharding.index_codecs] != [BytesCodec, Crc32cCodec]:
        return None
    chunk, shard = tuple(sharding.chunk_shape), tuple(arr.shards)
    if len(shard) < 2 or chunk[2:] != shard[2:] or chunk[1] not in (1, shard[1]) or shard[0] % chunk[0]:
        return None  # inner chunks split only rows and views: a chunk is whole rows of all views, or of one
    encoding = arr.metadata.chunk_key_encoding
    if getattr(encoding, "name", "default") != "default" or getattr(encoding, "separator", "/") != "/":
        return None  # shard k is not at `<part>/c/<k>/0/...`
    endian = getattr(inner[0], "endian", None)
    dtype = np.dtype(arr.dtype)
    if dtype.itemsize > 1 and endian is not None and endian.value != "little":
        return None
    b = inner[1]
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[b.shuffle.value]
    return ShardPlan(dtype=dtype.newbyteorder("<"), chunk=chunk, shard=shard,
                     delta=delta, fill=arr.metadata.fill_value,
                     index_at_end=sharding.index_location == ShardingCodecIndexLocation.end,
                     blosc=(b.cname.value.encode(), int(b.clevel), shuffle, int(b.blocksize), int(b.typesize)))


def object_path(root: str, part_key: str, shard_plan: ShardPlan, k: int) -> str:
    """Where shard k of a stored part lives under the store's root (`<part>/c/<k>/0/...`)."""
    return root.rstrip("/") + "/" + part_key + "/c/" + "/".join([str(k)] + ["0"] * (len(shard_plan.shard) - 1))


def open_shard_views(store: "TargetStore", k: int, names: list[str], view_of_row: np.ndarray,
                     block: int | None = None) -> dict[str, dict[str, RowViews]]:
    """One view per row of a finished shard, still encoded: {name: {part: rows}}, where `rows`
    (`ShardViews`, or `LoadedViews` for codecs only Zarr reads) gives row r with
    `rows[r]` or `rows.decode_into(r, out)`; decode with `decode_rows`. Per-view arrays only.

    `view_of_row` int [count_k] names the view each row keeps. hdpipe's codec chains are read a
    shard object at a time, checked whole, and keep each row's chosen view compressed; others
    through Zarr `block` rows at a time (None: as many as hold BLOCK_BYTES of all their views, at
    least 64; Zarr's cost per call made blocks of 64 take 1.5-1.7x as long as one read of 1,024).
    """
    integrity.verified_marker(store, k, names)
    first, count = store.shard_rows(k)  # names: the store's own (`TargetStore._names`)
    views = np.asarray(view_of_row, dtype=np.int64).reshape(-1)
    if views.shape != (count,) or (count and (views.min() < 0 or views.max() >= store.views)):
        raise StoreError(f"shard {k}: view_of_row must hold {count} view ids in [0, {store.views})")
    out: dict[str, dict[str, RowViews]] = {}
    for name in names:
        if not store.arrays[name].per_view:
            raise StoreError(f"array {name!r} of {store.url} is per sample, not per view")
        out[name] = {}
        for p in stored_parts(store.arrays[name]):
            arr = store._array(part_name(name, p))
            fast = plan(arr)
            if fast is not None:  # the whole shard object in one read, no per-chunk Zarr calls
                out[name][p] = open_views(store, name, part_name(name, p), fast, k, count, views)
                continue
            pieces = []
            step = block or max(64, BLOCK_BYTES // (arr.dtype.itemsize * int(np.prod(arr.shape[1:])) or 1))
            for a in range(0, count, step):
                with integrity.reading(store, k, name):
                    rows = arr[first + a : first + min(count, a + step)]  # [b, V, ...]
                pieces.append(rows[np.arange(len(rows)), views[a : a + len(rows)]])
            out[name][p] = LoadedViews(
                np.concatenate(pieces) if pieces else np.zeros((0,) + arr.shape[2:], arr.dtype))
    return out


def read_views(store: "TargetStore", name: str, part_key: str, shard_plan: ShardPlan, k: int, count: int,
               views: np.ndarray) -> np.ndarray:
    """Rows 0..count-1 of shard k of one stored part (`part_key`, array `name`'s), the view
    `views[r]` of each: [count, *tail]. Raises ShardDamagedError on any checksum mismatch."""
    return np.asarray(open_views(store, name, part_key, shard_plan, k, count, views))


def open_views(store: "TargetStore", name: str, part_key: str, shard_plan: ShardPlan, k: int, count: int,
               views: np.ndarray) -> "ShardViews":
    """Rows 0..count-1 of shard k of one stored part, the view `views[r]` of each, checked and kept
    compressed (`ShardViews`): every chunk's crc32c is checked here, before any row is used, and
    only the chunks holding a chosen view are kept. Raises ShardDamagedError on any mismatch."""
    from pipeline import urls

    fs, root = urls.fs_and_path(store.url)
    try:
        data = _shard_bytes(fs, object_path(root, part_key, shard_plan, k))
    except FileNotFoundError:
        raise integrity.damaged(store, k, name, f"its file {part_key} is missing") from None
    return _checked_views(store, name, part_key, shard_plan, k, count, views, data)


def _shard_bytes(fs, path: str) -> np.ndarray:
    """The shard object's bytes as read-only uint8: a local file mapped (its chunks are checked in
    place and the wanted ones copied out, so the whole file is never copied), anything else fetched
    in one request."""
    from pipeline import urls

    if not urls.is_local_fs(fs):
        return np.frombuffer(fs.cat_file(path), dtype=np.uint8)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


def chunk_grid(shard_plan: ShardPlan) -> tuple[int, int]:
    """(chunks along rows, chunks along views) of one shard; the index lists them in C order."""
    return shard_plan.shard[0] // shard_plan.chunk[0], shard_plan.shard[1] // shard_plan.chunk[1]


def _crc_ok(data: np.ndarray, off: int, nbytes: int) -> bool:
    """Whether data[off:off + nbytes] ends with the crc32c of the bytes before it (checked in place)."""
    if nbytes < 4 or off + nbytes > len(data):
        return False
    stored = int.from_bytes(data[off + nbytes - 4:off + nbytes].tobytes(), "little")
    return google_crc32c.value(data[off:off + nbytes - 4]) == stored


def _checked_views(store, name: str, part_key: str, shard_plan: ShardPlan, k: int, count: int, views: np.ndarray,
                   data: np.ndarray) -> "ShardViews":
    rows_per_chunk, views_per_chunk = shard_plan.chunk[:2]
    grid = chunk_grid(shard_plan)
    n_chunks = grid[0] * grid[1]
    index_bytes = n_chunks * 16 + 4
    if len(data) < index_bytes:
        raise integrity.damaged(store, k, name, f"its file {part_key} is shorter than its shard index")
    at = len(data) - index_bytes if shard_plan.index_at_end else 0
    if not _crc_ok(data, at, index_bytes):
        raise integrity.damaged(store, k, name, "a crc32c does not match the bytes on disk")
    offsets = data[at:at + index_bytes - 4].view("<u8").reshape(n_chunks, 2)
    # Every chunk's crc32c is checked, also of views this epoch does not show (~9 GB/s, against
    # ~1 GB/s to decompress): a damaged byte anywhere stops the run as a Zarr read of the row would.
    for off, nbytes in offsets.tolist():
        if off != _EMPTY and not _crc_ok(data, off, nbytes):
            raise integrity.damaged(store, k, name, "a crc32c does not match the bytes on disk")
    rows = np.arange(count)
    chunk_of_row = (rows // rows_per_chunk) * grid[1] + np.asarray(views[:count], dtype=np.int64) // views_per_chunk
    within = (rows % rows_per_chunk) * views_per_chunk + np.asarray(views[:count], dtype=np.int64) % views_per_chunk
    # The chosen chunks' bodies (crc32c off), each once, copied back to back: a row holds one chunk's
    # compressed bytes, never its shard's other views, and the mapping is released with `data`.
    chosen, slot = np.unique(chunk_of_row, return_inverse=True)
    spans = np.full((len(chosen), 2), -1, dtype=np.int64)
    bodies, start = [], 0
    for i, c in enumerate(chosen.tolist()):
        off, nbytes = (int(v) for v in offsets[c])
        if off != _EMPTY:
            bodies.append(data[off:off + nbytes - 4])
            spans[i] = (start, nbytes - 4)
            start += nbytes - 4
    kept = np.concatenate(bodies) if bodies else np.zeros(0, dtype=np.uint8)
    return ShardViews(shard_plan, kept, spans[slot.reshape(-1)], within)


class ShardViews:
    """Rows of one stored part's shard, one view each, still compressed and already checked:
    `decode_into(r, out)` decompresses row r's view straight into `out` (a batch row: the loader
    decodes into its shared-memory batch, so no copy of the values is made after the decompression).
    `views[r]` and `np.asarray(views)` give decoded arrays."""

    def __init__(self, shard_plan: ShardPlan, data: np.ndarray, spans: np.ndarray, within: np.ndarray):
        self.plan, self.data, self.spans, self.within = shard_plan, data, spans, within
        self.row_shape = shard_plan.chunk[2:]
        self.dtype = shard_plan.dtype
        self.shape = (len(spans),) + self.row_shape
        # A chunk of one row's one view without a filter decompresses into its place in the batch.
        self._direct = shard_plan.chunk[:2] == (1, 1) and shard_plan.delta is None
        self._last: tuple[int, np.ndarray] | None = None  # the last chunk decompressed whole (chunks of views)

    def __len__(self) -> int:
        return len(self.spans)

    def decode_into(self, r: int, out: np.ndarray) -> None:
        start, nbytes = (int(v) for v in self.spans[r])
        if nbytes < 0:  # a chunk the shard does not hold
            out[...] = self.plan.fill
            return
        body = self.data[start:start + nbytes]
        if self._direct:
            held = int.from_bytes(body[4:8].tobytes(), "little")  # Blosc header: the uncompressed size
            if held != out.nbytes:
                raise ValueError(f"a stored chunk decompresses to {held} bytes, its row is {out.nbytes}")
            blosc.decompress(body, out)
            return
        if self._last is None or self._last[0] != start:
            raw = blosc.decompress(body)
            if self.plan.delta is not None:
                raw = self.plan.delta.decode(raw)
            self._last = (start, np.frombuffer(raw, dtype=self.dtype).reshape(-1, *self.row_shape))
        out[...] = self._last[1][self.within[r]]

    def __getitem__(self, r: int) -> np.ndarray:
        out = np.empty(self.row_shape, dtype=self.dtype)
        self.decode_into(int(r), out)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        for r in range(len(self)):
            self.decode_into(r, out[r, ...])
        return out if dtype is None else out.astype(dtype, copy=False)


class LoadedViews:
    """`ShardViews`' interface over rows already decoded (a part Zarr read)."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.row_shape, self.dtype, self.shape = rows, rows.shape[1:], rows.dtype, rows.shape

    def __len__(self) -> int:
        return len(self.rows)

    def decode_into(self, r: int, out: np.ndarray) -> None:
        out[...] = self.rows[r]

    def __getitem__(self, r: int) -> np.ndarray:
        return self.rows[r]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.rows if dtype is None else self.rows.astype(dtype, copy=False)


RowViews = ShardViews | LoadedViews  # one stored part's rows of a shard, a view each (`TargetStore.open_shard_views`)
