"""Target shards checked like tars: every stored byte checksummed, every file's length recorded.

A finished Zarr shard is trusted only when what is on disk is what its writer wrote:
- each chunk carries a crc32c of its compressed bytes (the `crc32c` codec, `schema.codecs`) and
  each shard index its own (Zarr's default), so Zarr refuses a flipped byte anywhere in a file
  while it reads it;
- the done marker records the length of every file the shard wrote (`files` {key: bytes}), so a
  missing file (Zarr would read fill values: zeros) or a truncated or extended one is found by a
  `stat` before any row is read.
Both cost next to nothing on the read path (crc32c runs at ~9 GB/s; one stat per file per shard).
What they do not catch: a whole file replaced by another valid file of the same length (another
shard's, say), which no accident produces; a writer who can replace files can rewrite markers too.

A mismatch is an `IntegrityError` naming the store, the shard, the array and the command that
extracts exactly that shard again (`hdpipe extract ... --rebuild-shards K`); `damaged_shards`
(lengths only, one listing per array) is what `inspect` reports and `extract` rebuilds on rerun,
and `check_content` (every chunk decoded) is `inspect --content`.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from pipeline.errors import ShardDamagedError
from pipeline.urls import is_local_fs
from pipeline.targets.schema import part_name, stored_parts

if TYPE_CHECKING:
    from pipeline.targets.store import TargetStore


def shard_files(store: "TargetStore", k: int, names: Iterable[str]) -> dict[str, str]:
    """{file key relative to the store: array name} of Zarr shard k of every stored part of `names`.

    A part [N, V, *tail] sharded (S, V, *tail) keeps shard k in `<part>/c/<k>/0/.../0` (one 0 per
    further axis, Zarr v3's default chunk key encoding)."""
    out = {}
    for name in names:
        spec = store.arrays[name]
        for part, (tail, _) in stored_parts(spec).items():
            ndim = (2 if spec.per_view else 1) + len(tail)
            out[f"{part_name(name, part)}/c/{int(k)}" + "/0" * (ndim - 1)] = name
    return out


def file_lengths(store: "TargetStore", keys: Iterable[str]) -> dict[str, int | None]:
    """{key: bytes on disk, None when absent} (one stat per file: `os.stat` on a local disk)."""
    out: dict[str, int | None] = {}
    local = is_local_fs(store.fs)
    for key in keys:
        path = f"{store.path}/{key}"
        if local:  # fsspec's size() costs ~20x the stat under it; inspect and resume do 11 per shard
            try:
                out[key] = os.stat(path).st_size
            except FileNotFoundError:
                out[key] = None
            continue
        store.fs.invalidate_cache(path)  # an object store's listing cache may predate the file's removal
        try:
            out[key] = int(store.fs.size(path))
        except FileNotFoundError:
            out[key] = None
    return out


def remove_files(store: "TargetStore", keys: Iterable[str]) -> None:
    """Delete these files of the store where they exist."""
    for key in keys:
        try:
            store.fs.rm(f"{store.path}/{key}")
        except FileNotFoundError:
            pass


def recorded_manifest(store: "TargetStore") -> str:
    """The manifest the store was extracted from (`extract-config.json`), for fix-it commands."""
    path = f"{store.path}/extract-config.json"
    try:
        with store.fs.open(path, "rb") as f:
            return str(json.loads(f.read()).get("manifest") or "<manifest>")
    except (FileNotFoundError, ValueError):
        return "<manifest>"


def rebuild_hint(store: "TargetStore", shards: Iterable[int]) -> str:
    from pipeline.targets.hints import rebuild_command

    return rebuild_command(store.attrs, manifest=recorded_manifest(store), out=store.url, shards=list(shards))


def damaged(store: "TargetStore", k: int, name: str, why: str) -> ShardDamagedError:
    return ShardDamagedError(
        f"target store {store.url}: shard {k} of array {name!r} is damaged ({why}); nothing of it was used. "
        f"Extract exactly that shard again with `{rebuild_hint(store, [k])}`",
        store=store.url, shard=int(k), array=name, why=why)


def length_problems(marker: dict, lengths: dict[str, int | None]) -> dict[str, str]:
    """{key: what is wrong} for files whose length differs from the done marker's record."""
    recorded = marker.get("files") or {}
    out = {}
    for key, got in lengths.items():
        want = recorded.get(key)
        if want is None:
            out[key] = "its done marker records no such file"
        elif got is None:
            out[key] = f"file {key} is missing (the done marker records {want} bytes)"
        elif got != want:
            out[key] = f"file {key} holds {got} bytes, the done marker records {want}"
    return out


def verified_marker(store: "TargetStore", k: int, names: Iterable[str]) -> dict:
    """Shard k's done marker, once every file of shard k of `names` has the length it records."""
    names = list(names)
    for name in names:  # parts in another encoding are refused first: rebuilding a shard cannot fix that
        for part in stored_parts(store.arrays[name]):
            store._array(part_name(name, part))
    marker = store.done_marker(k)
    files = shard_files(store, k, names)
    problems = length_problems(marker, file_lengths(store, files))
    if problems:
        key, why = next(iter(problems.items()))
        raise damaged(store, k, files[key], why)
    return marker


@contextlib.contextmanager
def reading(store: "TargetStore", k: int, name: str) -> Iterator[None]:
    """Turn Zarr's checksum failure while reading shard k of `name` into a named IntegrityError."""
    try:
        yield
    except ValueError as e:
        if "checksum" not in str(e):
            raise  # not a damaged byte: a bug keeps its traceback
        raise damaged(store, k, name, "a crc32c does not match the bytes on disk") from None


def read_sorted_rows(store: "TargetStore", arr, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted global indices) of one stored part `arr` of array `name`. A run of rows is
    one read (Zarr fetches the shard files concurrently: the `valid` rows of 1,252 shards in a third
    of the time of a read per shard); other rows are read shard by shard, `rows` split in one pass.
    A damaged chunk is an error naming its shard (a failed run is read again shard by shard)."""
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        try:
            return arr[int(rows[0]) : int(rows[-1]) + 1]
        except ValueError as e:
            if "checksum" not in str(e):
                raise
    shards = np.unique(rows // store.shard_size)
    bounds = np.searchsorted(rows, np.append(shards, shards[-1] + 1) * store.shard_size)
    got = []
    for k, a, b in zip(shards, bounds[:-1], bounds[1:]):  # rows[a:b]: those in shard k
        with reading(store, int(k), name):
            got.append(arr.get_orthogonal_selection((rows[a:b],) + (slice(None),) * (arr.ndim - 1)))
    return np.concatenate(got)


def damaged_shards(store: "TargetStore") -> dict[int, str]:
    """{done shard: why} for shards whose files are missing or not the length their marker records.

    On a local disk one `os.stat` per file (13,800 for a MIM store of ImageNet's 1,252 shards: 0.1 s;
    walking the nested chunk folders with fsspec took 20x that); on an object store one listing per
    stored part, not a request per file. Flipped bytes of the right length are `check_content`'s
    (and every reader's) to find."""
    done = sorted(store.done_shards())
    if not done:
        return {}
    if is_local_fs(store.fs):
        lengths = file_lengths(store, [key for k in done for key in shard_files(store, k, store.arrays)])
    else:
        lengths = {}
        for part in {key.split("/c/")[0] for key in shard_files(store, 0, store.arrays)}:
            folder = f"{store.path}/{part}/c"
            store.fs.invalidate_cache(folder)
            if store.fs.exists(folder):
                for path, info in store.fs.find(folder, detail=True).items():
                    lengths[path[len(store.path.rstrip("/")) + 1:].lstrip("/")] = int(info["size"])
    out = {}
    for k in done:
        files = shard_files(store, k, store.arrays)
        problems = length_problems(store.done_marker(k), {key: lengths.get(key) for key in files})
        if problems:
            key, why = next(iter(problems.items()))
            out[k] = f"array {files[key]!r}: {why}"
    return out


def check_content(store: "TargetStore", k: int) -> str | None:
    """Why shard k is damaged, or None: every file's length and every chunk's crc32c (a full read)."""
    try:
        store.read_parts(k, sorted(store.arrays))
    except ShardDamagedError as e:
        return f"array {e.array!r}: {e.why}"
    return None
