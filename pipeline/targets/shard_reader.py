"""Whole Zarr shard objects read in one request and decoded chunk by chunk, without Zarr's per-chunk
machinery: stage two's read path (`TargetStore.read_shard_views`).

Zarr 3 costs ~0.5 ms of CPU per chunk outside the codecs themselves (its async pipeline, selection
and buffer objects), about as much as decompressing a ViT-B row of fp16 relations; a q1pct target is
six stored parts, so six chunks per row. A loader reads every row of a shard, so here one shard
object is read whole (one `open().read()` locally, one GET on an object store) and its inner chunks
are decoded straight with the codecs the store declared: the shard index (Zarr v3 `sharding_indexed`:
n x (offset, nbytes) uint64 + crc32c), then per chunk crc32c, Blosc, an optional numcodecs delta
filter. Only the chunks of the rows asked for are decoded, and of each only the view the epoch shows
is kept.

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

from pipeline.targets import integrity

if TYPE_CHECKING:
    from pipeline.targets.store import TargetStore

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


def _checked(data: bytes, off: int, nbytes: int) -> bytes | None:
    """The bytes before the trailing crc32c of data[off:off + nbytes], or None when they do not match
    it (one copy: google_crc32c takes bytes only, and the same copy goes to Blosc)."""
    if nbytes < 4 or off + nbytes > len(data):
        return None
    body = data[off:off + nbytes - 4]
    return body if google_crc32c.value(body) == int.from_bytes(data[off + nbytes - 4:off + nbytes], "little") else None


def read_views(store: "TargetStore", name: str, part_key: str, shard_plan: ShardPlan, k: int, count: int,
               views: np.ndarray) -> np.ndarray:
    """Rows 0..count-1 of shard k of one stored part (`part_key`, array `name`'s), the view
    `views[r]` of each: [count, *tail]. Raises ShardDamagedError on any checksum mismatch."""
    from pipeline import urls

    fs, root = urls.fs_and_path(store.url)
    try:
        data = _shard_bytes(fs, object_path(root, part_key, shard_plan, k))
    except FileNotFoundError:
        raise integrity.damaged(store, k, name, f"its file {part_key} is missing") from None
    try:
        return _decode_views(store, name, part_key, shard_plan, k, count, views, data)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def _shard_bytes(fs, path: str):
    """The shard object's bytes: a local file mapped (its chunks are copied out one at a time, never
    the whole file), anything else fetched in one request."""
    from pipeline import urls

    if not urls.is_local_fs(fs):
        return fs.cat_file(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def chunk_grid(shard_plan: ShardPlan) -> tuple[int, int]:
    """(chunks along rows, chunks along views) of one shard; the index lists them in C order."""
    return shard_plan.shard[0] // shard_plan.chunk[0], shard_plan.shard[1] // shard_plan.chunk[1]


def _decode_views(store, name: str, part_key: str, shard_plan: ShardPlan, k: int, count: int, views: np.ndarray,
                  data) -> np.ndarray:
    rows_per_chunk, views_per_chunk = shard_plan.chunk[:2]
    grid = chunk_grid(shard_plan)
    n_chunks = grid[0] * grid[1]
    index_bytes = n_chunks * 16 + 4
    if len(data) < index_bytes:
        raise integrity.damaged(store, k, name, f"its file {part_key} is shorter than its shard index")
    index = _checked(data, len(data) - index_bytes if shard_plan.index_at_end else 0, index_bytes)
    if index is None:
        raise integrity.damaged(store, k, name, "a crc32c does not match the bytes on disk")
    offsets = np.frombuffer(index, dtype="<u8").reshape(n_chunks, 2)
    tail = shard_plan.chunk[2:]
    per_view = int(np.prod(tail, dtype=np.int64))
    out = np.empty((count,) + tail, dtype=shard_plan.dtype)
    for block in range(-(-count // rows_per_chunk)):
        rows = range(block * rows_per_chunk, min(count, (block + 1) * rows_per_chunk))
        wanted = {int(views[r]) // views_per_chunk for r in rows}
        decoded: dict[int, np.ndarray | None] = {}  # view chunk -> values [rows, views, per_view]; None: not stored
        for j in range(grid[1]):
            off, nbytes = (int(v) for v in offsets[block * grid[1] + j])
            if off == _EMPTY:
                decoded[j] = None
                continue
            # Every chunk's crc32c is checked, also of views this epoch does not show (~9 GB/s, against
            # ~1 GB/s to decompress): a damaged byte anywhere stops the run as a Zarr read of the row would.
            body = _checked(data, off, nbytes)
            if body is None:
                raise integrity.damaged(store, k, name, "a crc32c does not match the bytes on disk")
            if j in wanted:
                raw = blosc.decompress(body)
                if shard_plan.delta is not None:
                    raw = shard_plan.delta.decode(raw)
                decoded[j] = np.frombuffer(raw, dtype=shard_plan.dtype).reshape(rows_per_chunk, views_per_chunk,
                                                                                 per_view)
        for r in rows:
            values = decoded[int(views[r]) // views_per_chunk]
            if values is None:
                out[r] = shard_plan.fill
            else:
                out[r] = values[r % rows_per_chunk, int(views[r]) % views_per_chunk].reshape(tail)
    return out
