"""Zarr shard objects read whole (or by range) and decoded chunk by chunk, without Zarr's per-chunk
machinery: stage two's read path (`TargetStore.open_shard_views`, `read_shard_views`).

Zarr 3 costs ~0.5 ms of CPU per chunk outside the codecs themselves (its async pipeline, selection
and buffer objects), about as much as decompressing a ViT-B row of fp16 relations; a q1pct target is
six stored parts, so six chunks per row. A loader reads every row of a shard, so here a shard object
is opened once (a local file mapped, an object fetched in one GET, or by ranges once checked) and
its inner chunks are decoded straight with the codecs the store declared: the shard index (Zarr v3
`sharding_indexed`: n x (offset, nbytes) uint64 + crc32c), then per chunk crc32c, Blosc, an optional
numcodecs delta filter.

Only the chunks holding the views shown are kept, still compressed (`ShardViews`), and each is
decompressed when its row is used, straight into the row's place in the batch (the loader's batches
live in shared memory, so the trip to the training process copies nothing): a value is written once
on the host between the file and the batch. A file's first open in a process checks every chunk's
crc32c; later opens check and read only the chunks they keep, so with chunks per view an epoch reads
one view's bytes per row whatever the number of views stored.

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

# Shard files whose every chunk this process checked (local: path, size, mtime, inode; an object:
# its path): damage anywhere stops the first epoch that opens a shard, and later opens check (and
# read) only the chunks they use. A rewritten local file is a new version, checked whole again.
_WHOLE_CHECKED: set[tuple] = set()
RANGE_GAP = 1 << 20  # ranged GETs of an object's chunks: chunks closer than this are one request
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
    shard object at a time (`open_views`), keeping each row's chosen view compressed; others
    through Zarr `block` rows at a time (None: as many as hold BLOCK_BYTES of all their views, at
    least 64; Zarr's cost per call made blocks of 64 take 1.5-1.7x as long as one read of 1,024).
    """
    integrity.verified_marker(store, k, names)
    first, count = store.shard_rows(k)  # names: checked by the caller (`TargetStore._names`)
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
            if fast is not None:  # the shard object opened once, no per-chunk Zarr calls
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
    compressed (`ShardViews`): the crc32c of every chunk holding a chosen view is checked here,
    before any row is used, and only those chunks are kept (a file's first open in this process
    checks every chunk: `_WHOLE_CHECKED`). Raises ShardDamagedError on a mismatch.

    A local file is mapped, so only the chunks checked or kept are read. An object is fetched whole
    at its first open, then (chunks per view) its index and the chosen chunks only, in ranged GETs
    that merge chunks less than RANGE_GAP apart: at 10 views an epoch reads a tenth of the store."""
    from pipeline import urls

    fs, root = urls.fs_and_path(store.url)
    path = object_path(root, part_key, shard_plan, k)
    rows = np.arange(count)
    shown = np.asarray(views[:count], dtype=np.int64)
    rows_per_chunk, views_per_chunk = shard_plan.chunk[:2]
    chunk_of_row = (rows // rows_per_chunk) * chunk_grid(shard_plan)[1] + shown // views_per_chunk
    within = (rows % rows_per_chunk) * views_per_chunk + shown % views_per_chunk
    chosen, slot = np.unique(chunk_of_row, return_inverse=True)
    local = urls.is_local_fs(fs)
    copy = False  # whether the kept chunks are copied out of a fetched whole object (its other views let go)
    try:
        if local or (path,) not in _WHOLE_CHECKED or views_per_chunk > 1:
            data, version = _shard_bytes(fs, path)
            copy = not local
            offsets = _index(store, name, part_key, shard_plan, k, data)
            if version not in _WHOLE_CHECKED:
                for off, nbytes in offsets.tolist():
                    if off != _EMPTY and not _crc_ok(data, off, nbytes):
                        raise integrity.damaged(store, k, name, "a crc32c does not match the bytes on disk")
                _WHOLE_CHECKED.add(version)
            bodies = [None if offsets[c][0] == _EMPTY else data[int(offsets[c][0]):int(offsets[c].sum())]
                      for c in chosen.tolist()]
        else:
            offsets, bodies = _fetch_chunks(store, name, part_key, shard_plan, k, fs, path, chosen)
    except FileNotFoundError:
        raise integrity.damaged(store, k, name, f"its file {part_key} is missing") from None
    # The chosen chunks (those holding a row's shown view), each once: crc32c checked, all of them
    # before any row is used, as Zarr checks each chunk it reads. A local file's chunks stay where
    # they are mapped (page cache, nothing copied; hdpipe's writers replace a file, never truncate
    # it in place, so a mapping stays valid); a fetched object's are copied out of the whole
    # object (its other views are let go) or kept in their ranged GETs' buffers.
    kept: list[np.ndarray | None] = []
    for body in bodies:
        if body is not None and not _crc_ok(body, 0, len(body)):
            raise integrity.damaged(store, k, name, "a crc32c does not match the bytes on disk")
        kept.append(None if body is None else (body[:-4].copy() if copy else body[:-4]))
    return ShardViews(shard_plan, kept, slot.reshape(-1), within)


def _shard_bytes(fs, path: str) -> tuple[np.ndarray, tuple]:
    """The shard object's bytes as read-only uint8, and what identifies this version of the file
    (`_WHOLE_CHECKED`): a local file mapped, anything else fetched in one request."""
    from pipeline import urls

    if not urls.is_local_fs(fs):
        return np.frombuffer(fs.cat_file(path), dtype=np.uint8), (path,)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        version = (path, st.st_size, st.st_mtime_ns, st.st_ino)
        if st.st_size == 0:
            return np.zeros(0, dtype=np.uint8), version
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8), version


def _index_bytes(shard_plan: ShardPlan) -> int:
    grid = chunk_grid(shard_plan)
    return grid[0] * grid[1] * 16 + 4


def _index(store, name: str, part_key: str, shard_plan: ShardPlan, k: int, data: np.ndarray,
           whole: bool = True) -> np.ndarray:
    """uint64 [chunks, 2] (offset, nbytes) of the shard index in `data` (the whole object, or with
    `whole` False the index's bytes alone), its crc32c checked."""
    n = _index_bytes(shard_plan)
    if len(data) < n:
        raise integrity.damaged(store, k, name, f"its file {part_key} is shorter than its shard index")
    at = len(data) - n if whole and shard_plan.index_at_end else 0
    if not _crc_ok(data, at, n):
        raise integrity.damaged(store, k, name, "a crc32c does not match the bytes on disk")
    return data[at:at + n - 4].view("<u8").reshape(-1, 2)


def _fetch_chunks(store, name: str, part_key: str, shard_plan: ShardPlan, k: int, fs, path: str,
                  chosen: np.ndarray) -> tuple[np.ndarray, list]:
    """The index and the chosen chunks' bytes of an object already checked whole, in ranged GETs:
    the index (a suffix or prefix range), then the chunks, merged where less than RANGE_GAP apart."""
    n = _index_bytes(shard_plan)
    raw = fs.cat_file(path, start=-n) if shard_plan.index_at_end else fs.cat_file(path, start=0, end=n)
    offsets = _index(store, name, part_key, shard_plan, k, np.frombuffer(raw, dtype=np.uint8), whole=False)
    wanted = sorted((int(offsets[c][0]), int(offsets[c].sum())) for c in chosen.tolist()
                    if offsets[c][0] != _EMPTY)
    ranges: list[list[int]] = []
    for lo, hi in wanted:
        if ranges and lo - ranges[-1][1] < RANGE_GAP:
            ranges[-1][1] = max(ranges[-1][1], hi)
        else:
            ranges.append([lo, hi])
    fetched = fs.cat_ranges([path] * len(ranges), [r[0] for r in ranges], [r[1] for r in ranges]) if ranges else []
    pieces = [(lo, np.frombuffer(got, dtype=np.uint8)) for (lo, _), got in zip(ranges, fetched)]
    bodies = []
    for c in chosen.tolist():
        off, nbytes = int(offsets[c][0]), int(offsets[c][1])
        if off == _EMPTY:
            bodies.append(None)
            continue
        lo, piece = next(p for p in reversed(pieces) if p[0] <= off)
        body = piece[off - lo:off - lo + nbytes]
        bodies.append(body if len(body) == nbytes else body[:0])  # short: the object shrank, fails its crc
    return offsets, bodies


def chunk_grid(shard_plan: ShardPlan) -> tuple[int, int]:
    """(chunks along rows, chunks along views) of one shard; the index lists them in C order."""
    return shard_plan.shard[0] // shard_plan.chunk[0], shard_plan.shard[1] // shard_plan.chunk[1]


def _crc_ok(data: np.ndarray, off: int, nbytes: int) -> bool:
    """Whether data[off:off + nbytes] ends with the crc32c of the bytes before it (checked in place)."""
    if nbytes < 4 or off + nbytes > len(data):
        return False
    stored = int.from_bytes(data[off + nbytes - 4:off + nbytes].tobytes(), "little")
    return google_crc32c.value(data[off:off + nbytes - 4]) == stored


class ShardViews:
    """Rows of one stored part's shard, one view each, still compressed and already checked:
    `decode_into(r, out)` decompresses row r's view straight into `out` (a batch row: the loader
    decodes into its shared-memory batch, so no copy of the values is made after the decompression).
    `views[r]` and `np.asarray(views)` give decoded arrays."""

    def __init__(self, shard_plan: ShardPlan, bodies: list, slot: np.ndarray, within: np.ndarray):
        # bodies: the kept chunks' compressed bytes (None: not stored, read as the fill value); row r's
        # chunk is bodies[slot[r]], its view at position within[r] of the decompressed chunk
        self.plan, self.bodies, self.slot, self.within = shard_plan, bodies, slot, within
        self.row_shape = shard_plan.chunk[2:]
        self.dtype = shard_plan.dtype
        self.shape = (len(slot),) + self.row_shape
        # A chunk of one row's one view without a filter decompresses into its place in the batch.
        self._direct = shard_plan.chunk[:2] == (1, 1) and shard_plan.delta is None
        self._last: tuple[int, np.ndarray] | None = None  # the last chunk decompressed whole (chunks of views)

    @property
    def nbytes(self) -> int:
        """Compressed bytes held."""
        return sum(len(b) for b in self.bodies if b is not None)

    def __len__(self) -> int:
        return len(self.slot)

    def decode_into(self, r: int, out: np.ndarray) -> None:
        i = int(self.slot[r])
        body = self.bodies[i]
        if body is None:  # a chunk the shard does not hold
            out[...] = self.plan.fill
            return
        if self._direct:
            held = int.from_bytes(body[4:8].tobytes(), "little")  # Blosc header: the uncompressed size
            if held != out.nbytes:
                raise ValueError(f"a stored chunk decompresses to {held} bytes, its row is {out.nbytes}")
            blosc.decompress(body, out)
            return
        if self._last is None or self._last[0] != i:
            raw = blosc.decompress(body)
            if self.plan.delta is not None:
                raw = self.plan.delta.decode(raw)
            self._last = (i, np.frombuffer(raw, dtype=self.dtype).reshape(-1, *self.row_shape))
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
