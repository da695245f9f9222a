"""Helpers for comparing target stores byte for byte, wherever they live (local or fsspec URL)."""
from __future__ import annotations

import socket

import fsspec


def chunk_files(url: str) -> dict[str, bytes]:
    """{path relative to the store: bytes} of every array file (chunks, shard files, array metadata).

    Left out: the group's zarr.json (its `created` time), done markers (times, pids, workers) and
    extract-config.json (the run's own settings): everything else is a pure function of the data.
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    out = {}
    for path in fs.find(root):
        rel = path[len(root) + 1:]
        if rel in ("zarr.json", "extract-config.json") or rel.startswith("done/"):
            continue
        out[rel] = fs.cat_file(path)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
