"""Deterministic webdataset tar writing: one tar per shard, published only when the dataset is whole.

We write tars with `tarfile` ourselves rather than webdataset's ShardWriter so that we control
every byte: fixed mtime/uid/gid/owner names/mode, USTAR headers (no PAX timestamps), members in
key order and, within a sample, in sorted extension order. The same samples therefore give
byte-identical tars (and the same sha256 in the manifest) on every run.

A tar is written to `<name>.tmp` and renamed when complete, so a crash never leaves a file that
looks like a finished shard. Object stores (no rename) get the whole tar in one PUT.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass

from pipeline.errors import ShardError
from pipeline import urls
from pipeline.urls import atomic_write_bytes, fs_and_path

# Header fields fixed so tars are reproducible (2000-01-01T00:00:00Z: some tools warn on mtime 0).
TAR_MTIME = 946684800
TAR_MODE = 0o444

def key_of(index: int) -> str:
    """The webdataset `__key__` of global sample `index`: 9 zero-padded digits, no dots."""
    return f"{index:09d}"


def shard_filename(name: str, k: int) -> str:
    return f"{name}-{k:06d}.tar"


@dataclass(frozen=True)
class SampleRecord:
    """One sample to write; its index and key are given by the writer."""

    name: str  # original relative path (or a synthetic name for generated samples)
    data: bytes  # encoded image bytes, stored as-is
    ext: str  # "jpg", "png" or "webp"
    label: int | None  # class label, None when unlabeled
    source: str  # where the sample came from (input folder, photo + crop box, ...)


def sample_members(index: int, rec: SampleRecord) -> dict[str, bytes]:
    """Tar members of one sample, per docs/ARCHITECTURE.md: image, optional .cls, .json."""
    meta = {"index": index, "label": rec.label, "name": rec.name, "source": rec.source}
    members = {rec.ext: rec.data, "json": json.dumps(meta, sort_keys=True).encode()}
    if rec.label is not None:
        members["cls"] = str(rec.label).encode("ascii")
    return members


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = TAR_MTIME
    ti.mode = TAR_MODE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class TarShardWriter:
    """Writes one tar shard deterministically: `with TarShardWriter(url) as w: w.add(key, members)`.

    On a clean exit the tar is complete under its final name and `w.sha256`/`w.count` are set; on
    an exception the temporary file is removed and nothing is left behind.
    """

    def __init__(self, url: str, overwrite: bool = False):
        self.url = str(url)
        self.fs, self.path = fs_and_path(self.url)
        self.local = urls.is_local_fs(self.fs)
        if not overwrite and self.fs.exists(self.path):
            raise ShardError(f"output shard {self.url} already exists; pass --overwrite to replace it "
                             "or choose another --out-dir/--name")
        self.count = 0
        self.sha256: str | None = None
        self._hash = hashlib.sha256()
        self._last_key: str | None = None
        if self.local:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._tmp = self.path + ".tmp"
            self._file = open(self._tmp, "wb")
        else:
            self._tmp = None
            self._file = io.BytesIO()
        self._sink = _HashingSink(self._file, self._hash)
        self._tar = tarfile.open(fileobj=self._sink, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; keys must be strictly increasing (members go in key order)."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"sample keys must increase: {key!r} after {self._last_key!r}")
        self._last_key = key
        for ext in sorted(members):
            data = members[ext]
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.count += 1

    def close(self, publish: bool = True) -> None:
        """Finish the tar. publish=False keeps a local tar under its temporary name until `publish()`
        (a dataset publishes all its tars only once every input was good)."""
        self._tar.close()
        self.sha256 = self._hash.hexdigest()
        if self.local:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if publish:
                self.publish()
        else:  # object stores have no rename; a single PUT is atomic
            atomic_write_bytes(self.url, self._file.getvalue())

    def publish(self) -> None:
        if self.local and os.path.exists(self._tmp):
            os.replace(self._tmp, self.path)

    def discard(self) -> None:
        """Remove a closed but unpublished tar (local: its temporary file; remote: the object)."""
        if self.local:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
        elif self.fs.exists(self.path):
            self.fs.rm(self.path)

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            self._file.close()
            if self._tmp is not None and os.path.exists(self._tmp):
                os.remove(self._tmp)

    def __enter__(self) -> "TarShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _HashingSink(io.RawIOBase):
    """A write-only file that hashes what passes through (so the sha256 costs no second read)."""

    def __init__(self, f, h):
        self._f, self._h, self._pos = f, h, 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def write(self, b) -> int:
        self._h.update(b)
        self._f.write(b)
        self._pos += len(b)
        return len(b)


@dataclass(frozen=True)
class Skipped:
    """An input left out (with --on-error skip), recorded in the manifest."""

    name: str  # original relative path
    reason: str  # the error message


MAX_LISTED_BAD = 20  # bad inputs named in one `--on-error fail` error


def write_dataset(records, *, name: str, out_dir: str, shard_size: int, total_inputs: int | None = None,
                  overwrite: bool = False, on_error: str = "fail", progress: bool = True):
    """Write `records` (a SampleRecord per good input, a Skipped per bad one) as tar shards.

    Samples get contiguous global indices 0, 1, ... in the order given; shard k receives indices
    [k*shard_size, (k+1)*shard_size) and is called `<out_dir>/<name>-{k:06d}.tar`. A `Skipped` item
    is collected (`on_error="skip"`) or (`"fail"`) stops the writing: the remaining inputs are still
    checked so that one error lists every bad file (up to MAX_LISTED_BAD), and nothing of the run
    is left behind. Local tars are published (renamed from their temporary names) only once every
    input was read, so a failed run leaves an existing dataset's tars as they were.

    Returns (shards, skipped, nbytes): a list of (url, count, first_index, sha256) per shard, the
    skipped inputs, and the total tar bytes written.
    """
    from tqdm import tqdm

    shards: list[tuple[str, int, int, str]] = []
    skipped: list[Skipped] = []
    bad: list[Skipped] = []
    closed: list[TarShardWriter] = []
    nbytes = 0
    writer: TarShardWriter | None = None
    index = 0
    folder_existed = _folder_exists(out_dir)
    finished = False
    bar = tqdm(total=total_inputs, unit="img", desc=f"shard {name}", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    try:
        for item in records:
            bar.update(1)
            if isinstance(item, Skipped):
                if on_error == "fail":
                    bad.append(item)
                    bar.set_postfix(bad=len(bad), refresh=False)
                    if len(bad) >= MAX_LISTED_BAD:
                        break
                    continue
                skipped.append(item)
                bar.set_postfix(skipped=len(skipped), refresh=False)
                continue
            if bad:
                continue  # the run will fail: only look for more bad inputs
            if writer is None:
                k = index // shard_size
                writer = TarShardWriter(urls.join(out_dir, shard_filename(name, k)), overwrite=overwrite)
                first = index
            writer.add(key_of(index), sample_members(index, item))
            index += 1
            if writer.count == shard_size:
                writer.close(publish=False)
                closed.append(writer)
                shards.append((writer.url, writer.count, first, writer.sha256))
                writer = None
        if bad:
            more = " (and possibly more: the check stopped there)" if len(bad) >= MAX_LISTED_BAD else ""
            listed = "; ".join(b.reason for b in bad)
            raise ShardError(f"{len(bad)} bad input file(s){more}: {listed}. Nothing was written; fix or remove "
                             "them, or pass --on-error skip to leave such inputs out and list them in the manifest")
        if writer is not None:
            writer.close(publish=False)
            closed.append(writer)
            shards.append((writer.url, writer.count, first, writer.sha256))
            writer = None
        for w in closed:
            w.publish()
            nbytes += w.fs.size(w.path)
        finished = True
    finally:
        bar.close()
        if not finished:  # nothing of a failed run stays: open and finished tars, a folder it made
            if writer is not None:
                writer.abort()
            for w in closed:
                w.discard()
            if not folder_existed:
                _remove_if_empty(out_dir)
    return shards, skipped, nbytes


def _folder_exists(folder: str) -> bool:
    """Whether an output folder exists already (remote prefixes are never removed: True)."""
    return urls.is_remote(folder) or os.path.isdir(folder)


def _remove_if_empty(folder: str) -> None:
    if not urls.is_remote(folder) and os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


def refuse_existing(out_dir: str, name: str, manifest_path: str, overwrite: bool) -> None:
    """Fail before any work if this dataset's tars or manifest already exist (unless overwrite)."""
    if overwrite:
        return
    fs, path = fs_and_path(urls.join(out_dir, shard_filename(name, 0)))
    existing = [path] if fs.exists(path) else []
    if not existing and not urls.is_remote(out_dir) and os.path.isdir(out_dir):
        existing = sorted(glob.glob(os.path.join(glob.escape(out_dir),
                                                 f"{glob.escape(name)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")))
    if existing:
        raise ShardError(f"output shard {existing[0]} already exists; pass --overwrite to replace the dataset "
                         f"'{name}' or choose another --name/--out-dir")
    mfs, mpath = fs_and_path(manifest_path)
    if mfs.exists(mpath):
        raise ShardError(f"manifest {manifest_path} already exists; pass --overwrite to replace it "
                         "or choose --manifest")


def remove_stale(out_dir: str, name: str, n_shards: int) -> None:
    """After an --overwrite run, delete this dataset's tars beyond the new shard count (local only)."""
    if not not urls.is_remote(out_dir) or not os.path.isdir(out_dir):
        return
    for p in glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(name)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        k = int(p[-10:-4])
        if k >= n_shards:
            os.remove(p)
