"""Locations: local paths and fsspec URLs (s3://, gs://, memory://, a shared file system) alike.

Every output and input of hdpipe may live on any fsspec file system; this is the one place that
knows how to tell a local path from a URL, join and split them, and write a file so that readers
see all of it or nothing.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import uuid

import fsspec

from pipeline.errors import storage_error


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and its path for `url` (local paths made absolute)."""
    return fsspec.core.url_to_fs(str(url))


def is_remote(url: str) -> bool:
    """True for a URL with a scheme other than file:// (s3://, gs://, memory://, ...)."""
    text = str(url)
    return "://" in text and not text.startswith("file://")


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether an fsspec file system is the local disk (rename is atomic; os calls work)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def local_path(url: str) -> str:
    """The absolute local path of a local path or file:// URL."""
    text = str(url)
    return os.path.abspath(text[len("file://"):] if text.startswith("file://") else text)


def absolute(url: str | None) -> str | None:
    """Local paths made absolute (workers of a cluster may run in another folder); URLs unchanged."""
    if url is None or is_remote(url):
        return url
    return local_path(url)


def join(base: str, *names: str) -> str:
    """`base/name/...` for local paths and URLs alike ('..' resolved for URLs)."""
    base = str(base)
    if is_remote(base):
        proto, rest = base.split("://", 1)
        return f"{proto}://{posixpath.normpath(posixpath.join(rest, *names))}"
    return os.path.normpath(os.path.join(base, *names))


def parent(url: str) -> str:
    """The folder holding `url` (absolute for local paths)."""
    text = str(url).rstrip("/")
    if is_remote(text):
        proto, rest = text.split("://", 1)
        return f"{proto}://{posixpath.dirname(rest)}"
    return os.path.dirname(local_path(text))


def is_absolute(url: str) -> bool:
    return "://" in str(url) or os.path.isabs(str(url))


def relative_to(url: str, folder: str) -> str:
    """`url` relative to `folder` when both are local (as a manifest records its tars), else `url`."""
    if is_remote(url) or is_remote(folder):
        return url
    return os.path.relpath(local_path(url), local_path(folder)).replace(os.sep, "/")


def sibling(url: str, suffix: str) -> str:
    """A new store beside `url`: targets/mae.zarr -> targets/mae-<suffix>.zarr."""
    head, tail = posixpath.split(str(url).rstrip("/"))
    stem = tail[:-5] if tail.endswith(".zarr") else tail
    name = f"{stem}-{suffix}.zarr"
    return posixpath.join(head, name) if head else name


def atomic_write_bytes(url: str, data: bytes | list[bytes]) -> None:
    """Write `data` (bytes, or a list of pieces written one after another: no joined copy) so that
    readers see either nothing or the whole file.

    Local and POSIX-like filesystems: write a temporary sibling and rename. Object stores have no
    rename but their single-object PUT is already atomic, so they are written directly. A failed
    write leaves the previous file at `url` as it was and no temporary file behind; a full, over
    quota or read-only disk is a one-line `WriteError` naming `url`.
    """
    fs, path = fs_and_path(url)
    try:
        folder = os.path.dirname(path)
        if folder:
            fs.makedirs(folder, exist_ok=True)
        if is_local_fs(fs):
            _replace_locally(path, data)
        else:
            with fs.open(path, "wb") as f:
                f.write(data if isinstance(data, bytes) else b"".join(data))  # one PUT of the whole object
    except OSError as e:
        refused = storage_error(e, url, kept=f"{os.path.basename(path)} there is unchanged")
        if refused is None:
            raise
        raise refused from None


def _replace_locally(path: str, data: bytes | list[bytes]) -> None:
    """Temporary sibling, fsync, rename; the temporary file is removed on any failure (a full disk
    would otherwise keep a partial copy as large as what fitted)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            for piece in [data] if isinstance(data, bytes) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: nothing half-written stays
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def unwritable_reason(url: str) -> str | None:
    """Why `url` cannot be written (its nearest existing local folder is not a folder, or not
    writable), or None. Remote URLs are not probed: creating the object says it."""
    fs, path = fs_and_path(url)
    if not is_local_fs(fs):
        return None
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    if not os.path.isdir(probe):
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def size_on_disk(url: str) -> int:
    """Bytes under `url` (0 when the file system cannot say)."""
    fs, path = fs_and_path(url)
    try:
        return int(fs.du(path, total=True))
    except (OSError, NotImplementedError):
        return 0
