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
    chunk: tuple[int, ...]  # inner chunk shape: (1, V, *tail) per-view parts
    shard: tuple[int, ...]  # shard shape: (S, V, *tail)
    delta: Delta | None  # numcodecs delta filter before the bytes codec (student pixels), or None
    fill: object  # fill value of chunks the shard does not hold
    index_at_end: bool


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
    if tuple(sharding.chunk_shape[1:]) != tuple(arr.shards[1:]) or len(arr.shards) < 2:
        return None  # inner chunks split only the row axis: a chunk is one or more whole rows of all views
    encoding = arr.metadata.chunk_key_encoding
    if getattr(encoding, "name", "default") != "default" or getattr(encoding, "separator", "/") != "/":
        return None  # shard k is not at `<part>/c/<k>/0/...`
    endian = getattr(inner[0], "endian", None)
    dtype = np.dtype(arr.dtype)
    if dtype.itemsize > 1 and endian is not None and endian.value != "little":
        return None
    return ShardPlan(dtype=dtype.newbyteorder("<"), chunk=tuple(sharding.chunk_shape), shard=tuple(arr.shards),
                     delta=delta, fill=arr.metadata.fill_value,
                     index_at_end=sharding.index_location == ShardingCodecIndexLocation.end)


def _crc_ok(data: memoryview) -> bool:
    return google_crc32c.value(bytes(data[:-4])) == int.from_bytes(data[-4:], "little")


def read_views(store: "TargetStore", name: str, part_key: str, shard_plan: ShardPlan, k: int, count: int,
               views: np.ndarray) -> np.ndarray:
    """Rows 0..count-1 of shard k of one stored part (`part_key`, array `name`'s), the view
    `views[r]` of each: [count, *tail]. Raises ShardDamagedError on any checksum mismatch."""
    from pipeline import urls

    fs, root = urls.fs_and_path(store.url)
    path = root.rstrip("/") + "/" + part_key + "/c/" + "/".join([str(k)] + ["0"] * (len(shard_plan.shard) - 1))
    try:
        data = memoryview(fs.cat_file(path))
    except FileNotFoundError:
        raise integrity.damaged(store, k, name, f"its file {part_key} is missing") from None
    rows_per_chunk = shard_plan.chunk[0]
    n_chunks = -(-shard_plan.shard[0] // rows_per_chunk)
    index_bytes = n_chunks * 16 + 4
    if len(data) < index_bytes:
        raise integrity.damaged(store, k, name, f"its file {part_key} is shorter than its shard index")
    index = data[-index_bytes:] if shard_plan.index_at_end else data[:index_bytes]
    if not _crc_ok(index):
        raise integrity.damaged(store, k, name, "a crc32c does not match the bytes on disk")
    offsets = np.frombuffer(index[:-4], dtype="<u8").reshape(n_chunks, 2)
    tail = shard_plan.chunk[2:]
    per_view = int(np.prod(tail, dtype=np.int64))
    out = np.empty((count,) + tail, dtype=shard_plan.dtype)
    for c in range(-(-count // rows_per_chunk)):
        off, nbytes = (int(v) for v in offsets[c])
        rows = range(c * rows_per_chunk, min(count, (c + 1) * rows_per_chunk))
        if off == _EMPTY:
            out[rows.start:rows.stop] = shard_plan.fill
            continue
        chunk = data[off:off + nbytes]
        if nbytes < 4 or off + nbytes > len(data) or not _crc_ok(chunk):
            raise integrity.damaged(store, k, name, "a crc32c does not match the bytes on disk")
        raw = blosc.decompress(bytes(chunk[:-4]))
        if shard_plan.delta is not None:
            raw = shard_plan.delta.decode(raw)
        values = np.frombuffer(raw, dtype=shard_plan.dtype).reshape(rows_per_chunk, -1, per_view)
        for i, r in enumerate(rows):
            out[r] = values[i, views[r]].reshape(tail)
    return out
