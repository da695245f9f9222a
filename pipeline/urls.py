"""Small fsspec helpers: every output path may be a local path or any fsspec URL (s3://, gs://, ...)."""
from __future__ import annotations

import os
import uuid

import fsspec


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and its path for `url` (local paths made absolute)."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write `data` so that readers see either nothing or the whole file.

    Local and POSIX-like filesystems: write a temporary sibling and rename. Object stores have no
    rename but their single-object PUT is already atomic, so they are written directly.
    """
    fs, path = fs_and_path(url)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if fs.protocol in ("file", "local") or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else ()):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)
