"""Input images from folders: an ImageNet-style class-folder tree (labeled) or a flat folder.

`scan_folder(root)` lists the files (sorted paths; labels from the sorted class-folder names);
`prepare_file(job)` reads, checks (fully decoded, decompression-bomb guard) and encodes one file
for a tar (`pipeline.data.images.encode_for_shard`); `prepared(jobs, workers)` runs it in worker
processes, keeping the input order.
"""
from __future__ import annotations

import os
from typing import Iterator

from pipeline.data.images import encode_for_shard
from pipeline.data.tars import SampleRecord, Skipped
from pipeline.errors import ShardError


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return [e for e in entries if not e.name.startswith(".")]  # .DS_Store, editor droppings


def scan_folder(root: str) -> tuple[list[tuple[str, str, int | None]], dict[str, int] | None]:
    """The input files of `root` as (absolute path, name relative to root, label) in sorted order,
    and the class map ({folder: label}) for a class-folder tree or None for a flat folder."""
    if not os.path.exists(root):
        raise ShardError(f"input folder {root} does not exist")
    if not os.path.isdir(root):
        raise ShardError(f"input {root} is not a folder (give a folder of images, or --urls for tars)")
    try:
        entries = _visible(list(os.scandir(root)))
    except PermissionError:
        raise ShardError(f"input folder {root} is not readable (permission denied)") from None
    dirs = sorted(e.name for e in entries if e.is_dir())
    files = sorted(e.name for e in entries if not e.is_dir())
    if dirs and files:
        raise ShardError(f"input folder {root} mixes files ({files[0]}, ...) with class folders ({dirs[0]}, ...): "
                         "use a flat folder of images or a folder of class folders")
    if dirs and set(dirs) <= {"train", "val", "validation", "test"}:
        raise ShardError(f"input folder {root} holds split folders {dirs}: give one split, e.g. "
                         f"--input {os.path.join(root, dirs[0])}")
    if not dirs:
        if not files:
            raise ShardError(f"input folder {root} is empty: no image files found")
        return [(os.path.join(root, f), f, None) for f in files], None
    class_map = {d: i for i, d in enumerate(dirs)}
    out = []
    for d in dirs:
        for dirpath, subdirs, names in os.walk(os.path.join(root, d)):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            for n in sorted(names):
                if n.startswith("."):
                    continue
                full = os.path.join(dirpath, n)
                out.append((full, os.path.relpath(full, root).replace(os.sep, "/"), class_map[d]))
    if not out:
        raise ShardError(f"input folder {root} is empty: its class folders {dirs[:3]}... hold no image files")
    return out, class_map


def prepare_file(job: tuple) -> SampleRecord | Skipped:
    """Read, check and encode one input file (runs in worker processes: plain tuple in, record out)."""
    path, name, label, source, reencode, quality, max_pixels = job
    try:
        with open(path, "rb") as f:
            data = f.read()
    except PermissionError:
        return Skipped(name, f"{path}: cannot read the file (permission denied)")
    except OSError as e:
        return Skipped(name, f"{path}: cannot read the file ({e.strerror or e})")
    if not data:
        return Skipped(name, f"{path}: empty file, not an image")
    try:
        out, ext = encode_for_shard(data, path, reencode=reencode, jpeg_quality=quality, max_pixels=max_pixels)
    except ShardError as e:
        return Skipped(name, str(e))
    return SampleRecord(name=name, data=out, ext=ext, label=label, source=source)


def prepared(jobs: list[tuple], workers: int) -> Iterator[SampleRecord | Skipped]:
    if workers == 1:
        for job in jobs:
            yield prepare_file(job)
        return
    import multiprocessing as mp

    # spawn, not fork: forking a process that runs tqdm's monitor thread can deadlock.
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(prepare_file, jobs, chunksize=16)  # imap keeps the input order
