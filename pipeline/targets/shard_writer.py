"""Whole Zarr shard objects encoded and written in one request, without Zarr's per-chunk machinery:
extraction's write path (`TargetStore.write_shard`), the mirror of `shard_reader`.

Zarr 3 spends ~0.5 ms of CPU per chunk outside the codecs (its async pipeline, selection, buffer and
morton-order bookkeeping); a row is one chunk per stored part, and a q1pct MIM row is six parts, so
Zarr's own work was most of extraction's store cost per view. Here each chunk goes straight through
the codecs the array declares (an optional numcodecs delta, bytes little-endian, Blosc with the
array's settings, crc32c), the chunks are laid out in Zarr's order with the `sharding_indexed` index
(n x (offset, nbytes) uint64 + crc32c), and the object is written once (`urls.atomic_write_bytes`:
a temporary file renamed locally, one PUT on an object store).

The bytes are exactly the ones Zarr writes for the same assignment (tests compare the files), so
Zarr and `shard_reader` read them and nothing about the store's format changes. As in Zarr
(`write_empty_chunks=False`), a chunk equal to the fill value is not stored, and a shard of nothing
but such chunks is no object at all. Arrays whose codec chain `shard_reader.plan` does not know are
written by Zarr.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import google_crc32c
import numpy as np
from numcodecs import blosc

from pipeline import urls
from pipeline.targets import shard_reader

if TYPE_CHECKING:
    from pipeline.targets.store import TargetStore

_EMPTY = np.uint64(2**64 - 1)


def write(store: "TargetStore", part_key: str, k: int, value: np.ndarray) -> None:
    """Write rows `value` ([count_k, *row shape]) of shard k of one stored part, replacing the
    shard. The shard's old object must already be gone (`integrity.remove_files`), as Zarr would
    otherwise merge into it."""
    arr = store._array(part_key)
    first, count = store.shard_rows(k)
    plan = shard_reader.plan(arr)
    if plan is None:
        arr[first:first + count] = value  # a codec chain this writer does not know: Zarr writes it
        return
    data = encode(plan, np.asarray(value))
    if data is not None:
        urls.atomic_write_bytes(shard_reader.object_path(store.url, part_key, plan, k), data)


def _chunk_order(grid: tuple[int, int], ndim: int) -> list[tuple[int, int]]:
    """Zarr's order of the chunks inside a shard: morton order over the chunk grid (rows x views; the
    other axes are whole, `shard_reader.plan`). Any order reads back (the index says where each chunk
    is); this one makes the files Zarr's, byte for byte."""
    try:
        from zarr.core.indexing import morton_order_iter
    except ImportError:  # a Zarr without it: C order, the same chunks and index, other offsets
        return [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    return [(c[0], c[1]) for c in morton_order_iter(grid + (1,) * (ndim - 2))]


def encode(plan: shard_reader.ShardPlan, value: np.ndarray) -> list[bytes] | None:
    """The shard object of rows `value` (fewer rows than the shard holds for the last shard) as its
    pieces in file order (written one after another, never joined), or None when every chunk equals
    the fill value."""
    rows_per_chunk, views_per_chunk = plan.chunk[:2]
    grid = shard_reader.chunk_grid(plan)
    if value.shape[1:] != plan.shard[1:] or len(value) > plan.shard[0]:
        raise ValueError(f"rows of shape {value.shape} do not fit a shard of {plan.shard}")
    value = np.ascontiguousarray(value, dtype=plan.dtype)
    cname, clevel, shuffle, blocksize, typesize = plan.blosc
    index = np.full((grid[0] * grid[1], 2), _EMPTY, dtype="<u8")
    pieces: list[bytes] = []
    offset = 0
    for i, j in _chunk_order(grid, len(plan.shard)):
        rows = value[i * rows_per_chunk:(i + 1) * rows_per_chunk, j * views_per_chunk:(j + 1) * views_per_chunk]
        if len(rows) == 0 or _is_fill(rows, plan.fill):
            continue  # a partial last chunk is padded with the fill value, which Zarr does not store either
        if len(rows) < rows_per_chunk:
            pad = np.full((rows_per_chunk - len(rows),) + rows.shape[1:], plan.fill, dtype=plan.dtype)
            rows = np.concatenate([rows, pad])
        raw = plan.delta.encode(rows) if plan.delta is not None else rows
        body = blosc.compress(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), cname, clevel, shuffle,
                              blocksize, typesize)
        piece = body + google_crc32c.value(body).to_bytes(4, "little")
        index[i * grid[1] + j] = (offset, len(piece))
        pieces.append(piece)
        offset += len(piece)
    if not pieces:
        return None
    index_body = index.tobytes()
    index_bytes = index_body + google_crc32c.value(index_body).to_bytes(4, "little")
    if not plan.index_at_end:
        index[index[:, 0] != _EMPTY, 0] += len(index_bytes)
        index_body = index.tobytes()
        return [index_body + google_crc32c.value(index_body).to_bytes(4, "little"), *pieces]
    return [*pieces, index_bytes]


def _is_fill(rows: np.ndarray, fill) -> bool:
    if fill is None:
        return False
    if not fill:  # 0 or False: the common case, one pass without a comparison array
        return not rows.any()
    return bool(np.array_equiv(rows, fill))
