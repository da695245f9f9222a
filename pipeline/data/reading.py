"""Reading tar shards back: one whole shard in index order, its sha256 checked as it is read.

`iter_shard(manifest, k)` / `read_shard_records(manifest, k)` yield (docs/ARCHITECTURE.md "Samples
and shards"):

    {"index": int,            # global sample index
     "label": int,            # class label, -1 when the dataset is unlabeled
     "name": str,             # original relative path of the image
     "image": PIL.Image (RGB) # or the stored encoded bytes with decode=False
    }

The index of a sample is `first_index + position in its tar` (the manifest fixes first_index).
Tars written by `hdpipe shard` also carry it in `__key__` and `<key>.json`; when they do, it is
checked, so a tar swapped for another is caught. Tars indexed with `hdpipe shard --urls` (written
by other tools) need not follow our key scheme: their samples are numbered by position.

Which process reads which shard is the caller's plan (extraction: one task per shard; stage two:
`pipeline.train.plan`); every hdpipe reader reads whole shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from typing import Any, Iterator

from pipeline.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTS, decode_image
from pipeline.data.manifest import Manifest
from pipeline.errors import IntegrityError, ManifestError, ShardError
from pipeline.urls import fs_and_path, is_local_fs


# webdataset's rule (tariterators.base_plus_ext): the key is the member name up to the first dot
# of its last path component; the rest is the extension.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_RE = re.compile(r"__[^/]*__($|/)")


def tar_samples(fileobj, url: str) -> Iterator[dict[str, Any]]:
    """Group the members of a tar stream into webdataset samples {"__key__", ext: bytes, ...}."""
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*")
    except Exception as e:
        raise ShardError(f"{url} is not a readable tar file ({type(e).__name__}: {e})") from None
    current: dict[str, Any] | None = None
    try:
        for info in tar:
            if info.name.startswith("/") or ".." in info.name.split("/"):
                # A sample name is a relative path inside the dataset; such a member is either a
                # hostile tar or a mistake, and would name files outside it when extracted.
                raise ShardError(f"{url}: member {info.name!r} has an absolute path or a '..' component; "
                                 "refusing the tar (sample names must be relative, without '..')")
            if not info.isreg() or _META_RE.match(info.name):
                continue
            m = _KEY_RE.match(info.name)
            if m is None:
                continue
            key, ext = m.group(1), m.group(2).lower()
            data = tar.extractfile(info).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            if ext in current:
                raise ShardError(f"{url}: member {info.name} appears twice")
            current[ext] = data
            tar.members = []  # streaming: do not keep every header in memory
    except (EOFError, OSError, tarfile.TarError) as e:
        raise ShardError(f"{url}: truncated or corrupt tar ({type(e).__name__}: {e})") from None
    if current is not None:
        yield current


def _image_ext(sample: dict[str, Any]) -> str | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def to_record(sample: dict[str, Any], index: int, url: str, decode: bool,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """One raw webdataset sample -> {"index", "label", "name", "image"} (checks the stored index);
    with `decode`, the image is decoded held to `max_pixels` (the manifest's `max_image_pixels`)."""
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
    stored = meta.get("index")
    if isinstance(stored, int) and stored != index:
        raise ManifestError(f"{url}: sample {sample['__key__']} says index {stored} but the manifest puts it at "
                            f"{index}; the tar does not belong to this manifest (re-run `hdpipe shard`)")
    label = sample_label(sample, meta, url)
    ext = _image_ext(sample)
    if ext is None:
        raise ShardError(f"{url}: sample {sample['__key__']} has no image member (looked for {IMAGE_EXTS})")
    data = sample[ext]
    name = meta.get("name") if isinstance(meta.get("name"), str) else sample["__key__"]
    what = f"{url}: sample {sample['__key__']} ({name})"
    image = decode_image(data, what, max_pixels=max_pixels) if decode else data
    return {"index": index, "label": -1 if label is None else label, "name": name, "image": image}


def sample_label(sample: dict[str, Any], meta: dict, url: str) -> int | None:
    """The class label of a sample: its `.cls` member, else the `label` of its `.json`; None if neither."""
    if "cls" in sample:
        text = sample["cls"].decode("ascii", errors="replace").strip()
        if not text.lstrip("-").isdigit():
            raise ShardError(f"{url}: sample {sample['__key__']} has a .cls member {text[:20]!r} that is not an "
                             "integer class label")
        return int(text)
    label = meta.get("label")
    return label if isinstance(label, int) and not isinstance(label, bool) else None


def _open(url: str):
    fs, path = fs_and_path(url)
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise ManifestError(f"shard tar {url} is missing; re-run `hdpipe shard` or fix the manifest's URLs") from None
    except PermissionError:
        raise ShardError(f"shard tar {url} is not readable (permission denied)") from None


# ---- integrity: every tar is hashed while it is read -----------------------------------------
#
# A tar's sha256 is checked against the manifest the first time a process reads it, from the bytes
# the reader consumes anyway (no second pass). The check completes when the tar has been read to
# its end, so records are trustworthy once the iterator is exhausted: every hdpipe consumer reads a
# whole shard before it uses any record of it (`read_shard_records`). Later reads in the same
# process trust the tar while its stamp (size, mtime, inode / the object store's ETag) is the one
# recorded at the check. Stage two's loader workers live for the whole run (`RunLoader`), so each
# checks a tar once, the first time it reads it.

_VERIFIED: dict[tuple[str, str], tuple] = {}  # (url, sha256) -> stamp at the successful check


def _stamp(url: str) -> tuple | None:
    """(size, mtime, inode) of a local file, (size, ETag/mtime) of an object; None when unknown."""
    fs, path = fs_and_path(url)
    try:
        if is_local_fs(fs):
            st = os.stat(path)
            return (st.st_size, st.st_mtime_ns, st.st_ino)
        info = fs.info(path)
    except FileNotFoundError:
        raise ManifestError(f"shard tar {url} is missing; re-run `hdpipe shard` or fix the manifest's URLs") from None
    mark = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "last_modified") if info.get(k)), None)
    return None if mark is None else (info.get("size"), str(mark))


class _HashingReader:
    """A read-only file wrapper that feeds every byte read into a hash."""

    def __init__(self, f, h):
        self._f, self._h = f, h

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self._h.update(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):  # the end-of-archive padding the tar reader did not consume
            pass


def integrity_error(url: str, got: str, want: str, where: str, fix: str) -> IntegrityError:
    return IntegrityError(
        f"tar {url} ({where}) has sha256 {got} but the manifest records {want}: the tar changed after it was "
        f"indexed, or is another tar. Nothing was read from it. Restore the original tar, or re-index the "
        f"dataset with `{fix}` (stores built from the old tar then refuse the new manifest: re-extract them)"
    )


def _indexed_samples(url: str, first_index: int, count: int, decode: bool, sha256: str | None = None,
                     where: str = "", fix: str = "hdpipe shard ... --overwrite",
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[dict[str, Any]]:
    stamp = _stamp(url) if sha256 else None
    check = sha256 is not None and (stamp is None or _VERIFIED.get((url, sha256)) != stamp)
    h = hashlib.sha256() if check else None
    n = 0
    with _open(url) as raw:
        f = _HashingReader(raw, h) if h is not None else raw
        for sample in tar_samples(f, url):
            if n >= count:
                raise ManifestError(f"{url} holds more than the {count} samples its manifest records")
            yield to_record(sample, first_index + n, url, decode, max_pixels)
            n += 1
        if h is not None:
            f.drain()
    if h is not None:
        got = h.hexdigest()
        if got != sha256:
            raise integrity_error(url, got, sha256, where or f"first index {first_index}", fix)
        if stamp is not None:
            _VERIFIED[(url, sha256)] = stamp
    if n != count:
        raise ManifestError(f"{url} holds {n} samples but its manifest records {count}")


def reindex_command(manifest: Manifest) -> str:
    """The command that rebuilds or re-indexes `manifest`'s tars: the one recorded in it, overwriting."""
    where = manifest.path or f"manifests/{manifest.name}.json"
    if manifest.command.startswith("hdpipe shard"):
        cmd = manifest.command
        if "--manifest" not in cmd and manifest.path is not None:
            cmd += f" --manifest {where}"
        return cmd + " --overwrite"
    return f"hdpipe shard --urls <the tars> --manifest {where} --overwrite"


def iter_shard(manifest: Manifest, k: int, decode: bool = True) -> Iterator[dict[str, Any]]:
    """Every sample of shard k in index order: dicts {"index", "label", "name", "image"}.

    `image` is an upright PIL RGB image (`pipeline.data.images.decode_image` with the manifest's
    `max_image_pixels`), or the stored bytes (JPEG/PNG/WebP, untouched) with decode=False. The tar's
    sha256 is checked against the manifest when the iterator reaches its end (`IntegrityError`): use
    `read_shard_records` to get a whole verified shard before using any record.
    """
    if not 0 <= k < manifest.num_shards:
        raise ManifestError(f"shard {k} outside 0..{manifest.num_shards - 1} of manifest "
                            f"{manifest.path or manifest.name}")
    info = manifest.shards[k]
    yield from _indexed_samples(manifest.shard_url(k), info.first_index, info.count, decode, info.sha256,
                                where=f"shard {k} of manifest {manifest.path or manifest.name}",
                                fix=reindex_command(manifest), max_pixels=manifest.max_image_pixels)


def read_shard_records(manifest: Manifest, k: int, decode: bool = False) -> list[dict[str, Any]]:
    """Every record of shard k, read to the end of the tar, so its sha256 has been checked."""
    return list(iter_shard(manifest, k, decode=decode))
