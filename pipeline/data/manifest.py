"""Dataset manifests: which tar shards make a dataset, and how global sample indices map onto them.

A manifest is a small JSON file users commit (`manifests/<name>.json`); the tars it names live
anywhere fsspec reaches. Layout (`schema_version` 1, see docs/ARCHITECTURE.md "Samples and shards"):

    {"schema_version": 1, "name": "sample", "shard_size": 128, "total": 512,
     "shards": [{"url": "../data/shards/sample/sample-000000.tar", "count": 128,
                 "first_index": 0, "sha256": "..."}, ...],
     "class_map": {"n01440764": 0, ...} | null, "skipped": [{"name": ..., "reason": ...}],
     "source": "...", "command": "hdpipe shard ...", "created": "2026-11-23T20:30:00Z",
     "max_image_pixels": 178956970}

`max_image_pixels` (optional; absent in manifests older than it = hdpipe's default) is the pixel
limit the images were sharded with: every stage decodes them with it, not with Pillow's own.

Shard k holds the global indices [k*S, k*S + count_k) with count_k == S for every shard but the
last (which may be shorter): the target stores chunk their rows by the same S, so a tar shard and
a Zarr shard always cover the same rows. `read_manifest` checks all of this and names the file and
key at fault.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.images import DEFAULT_MAX_PIXELS
from pipeline.errors import ManifestError
from pipeline import urls
from pipeline.urls import atomic_write_bytes, fs_and_path

SCHEMA_VERSION = 1

_TOP_KEYS = ("schema_version", "name", "shard_size", "total", "shards", "class_map", "skipped",
             "source", "command", "created", "max_image_pixels")
_SHARD_KEYS = ("url", "count", "first_index", "sha256")


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard of a dataset."""

    url: str  # as written in the manifest: relative to the manifest's folder, or an absolute path/URL
    count: int  # samples in this tar
    first_index: int  # global index of its first sample; its samples are [first_index, first_index + count)
    sha256: str  # hex digest of the whole tar file

    @property
    def indices(self) -> range:
        return range(self.first_index, self.first_index + self.count)


@dataclass(frozen=True)
class Manifest:
    """A validated dataset manifest; build with `read_manifest` or by the `shard` stage."""

    name: str  # dataset name; tars are called <name>-{k:06d}.tar
    shard_size: int  # S: samples per shard (the last shard may hold fewer)
    total: int  # number of samples = sum of shard counts
    shards: tuple[ShardInfo, ...]  # shard k is shards[k]
    class_map: dict[str, int] | None  # {class folder name: label}, None for unlabeled data
    skipped: tuple[dict[str, str], ...] = ()  # inputs left out by --on-error skip: {"name", "reason"}
    source: str = ""  # where the images came from (input folder, URL list, sample builder spec)
    command: str = ""  # the hdpipe command that wrote it
    created: str = ""  # UTC ISO-8601 time of writing
    schema_version: int = SCHEMA_VERSION
    # Decompression-bomb limit (pixels) the images were sharded with (`hdpipe shard --max-image-pixels`);
    # readers decode with it. Not part of `digest()`: the tars' bytes say which images exist.
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    # Where the manifest was read from or written to (not serialized); relative shard URLs resolve
    # against its folder. None for a manifest only held in memory (URLs must then be absolute).
    path: str | None = field(default=None, compare=False)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def labeled(self) -> bool:
        return self.class_map is not None

    @property
    def num_classes(self) -> int:
        return 0 if self.class_map is None else len(self.class_map)

    def shard_of(self, index: int) -> int:
        """The shard k that holds global sample `index`."""
        if not 0 <= index < self.total:
            raise IndexError(f"sample index {index} outside [0, {self.total}) of manifest {self.path or self.name}")
        return index // self.shard_size

    def shard_url(self, k: int) -> str:
        """The URL or local path to open for shard k (relative URLs resolved against the manifest folder)."""
        url = self.shards[k].url
        if urls.is_absolute(url):
            return url
        if self.path is None:
            raise ManifestError(f"manifest {self.name!r} has relative shard URL {url!r} but no file location "
                                "to resolve it")
        return urls.join(urls.parent(self.path), url)

    def shard_urls(self, shard_ids=None) -> list[str]:
        ids = range(self.num_shards) if shard_ids is None else shard_ids
        return [self.shard_url(k) for k in ids]

    def digest(self) -> str:
        """sha256 over (first_index, count, sha256) of every shard, in order.

        URLs are left out on purpose: moving or re-hosting the tars must not invalidate target
        stores built from them, while any change of content or order does.
        """
        h = hashlib.sha256()
        h.update(f"hdpipe-manifest-v{SCHEMA_VERSION}\n".encode())
        for s in self.shards:
            h.update(f"{s.first_index} {s.count} {s.sha256}\n".encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "shard_size": self.shard_size,
            "total": self.total,
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "class_map": None if self.class_map is None else dict(self.class_map),
            "skipped": [dict(s) for s in self.skipped],
            "source": self.source,
            "command": self.command,
            "created": self.created,
            "max_image_pixels": self.max_image_pixels,
        }


def _fail(where: str, key: str, msg: str) -> ManifestError:
    return ManifestError(f"manifest {where}: key '{key}': {msg}")


def _need(d: dict, key: str, types: tuple, where: str, prefix: str = "") -> Any:
    if key not in d:
        raise _fail(where, prefix + key, "missing")
    value = d[key]
    # bool is an int subclass; a count of `true` is a typo, not a number
    if isinstance(value, bool) and bool not in types:
        raise _fail(where, prefix + key, f"expected {'/'.join(t.__name__ for t in types)}, got {value!r}")
    if not isinstance(value, types):
        raise _fail(where, prefix + key,
                    f"expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__} {value!r}")
    return value


def manifest_from_dict(doc: Any, where: str = "<memory>", path: str | None = None) -> Manifest:
    """Validate a parsed manifest document and build the `Manifest` (errors name `where` and the key)."""
    if not isinstance(doc, dict):
        raise ManifestError(f"manifest {where}: expected a JSON object, got {type(doc).__name__}")
    version = _need(doc, "schema_version", (int,), where)
    if version != SCHEMA_VERSION:
        raise _fail(where, "schema_version", f"is {version}, this hdpipe reads version {SCHEMA_VERSION}; "
                    "re-create it with `hdpipe shard`")
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise _fail(where, unknown[0], f"unknown key (known: {list(_TOP_KEYS)})")
    name = _need(doc, "name", (str,), where)
    if not name:
        raise _fail(where, "name", "must not be empty")
    shard_size = _need(doc, "shard_size", (int,), where)
    if shard_size < 1:
        raise _fail(where, "shard_size", f"must be >= 1, got {shard_size}")
    total = _need(doc, "total", (int,), where)
    raw_shards = _need(doc, "shards", (list,), where)
    shards = []
    next_index = 0
    for k, s in enumerate(raw_shards):
        p = f"shards[{k}]."
        if not isinstance(s, dict):
            raise _fail(where, f"shards[{k}]", f"expected an object, got {type(s).__name__}")
        extra = sorted(set(s) - set(_SHARD_KEYS))
        if extra:
            raise _fail(where, p + extra[0], f"unknown key (known: {list(_SHARD_KEYS)})")
        url = _need(s, "url", (str,), where, p)
        count = _need(s, "count", (int,), where, p)
        first = _need(s, "first_index", (int,), where, p)
        sha = _need(s, "sha256", (str,), where, p)
        if not url:
            raise _fail(where, p + "url", "must not be empty")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise _fail(where, p + "sha256", f"expected 64 lowercase hex digits, got {sha!r}")
        if first != next_index:
            raise _fail(where, p + "first_index",
                        f"is {first}, expected {next_index}: index ranges must be contiguous from 0")
        if first != k * shard_size:
            raise _fail(where, p + "first_index", f"is {first}, expected k*shard_size = {k * shard_size}")
        last = k == len(raw_shards) - 1
        if count < 1 or count > shard_size or (not last and count != shard_size):
            want = f"1..{shard_size}" if last else f"{shard_size} (shard_size; only the last shard may be shorter)"
            raise _fail(where, p + "count", f"is {count}, expected {want}")
        shards.append(ShardInfo(url=url, count=count, first_index=first, sha256=sha))
        next_index = first + count
    if total != next_index:
        raise _fail(where, "total", f"is {total} but the shard counts sum to {next_index}")
    class_map = doc.get("class_map")
    if "class_map" not in doc:
        raise _fail(where, "class_map", "missing (null for unlabeled data)")
    if class_map is not None:
        if not isinstance(class_map, dict):
            raise _fail(where, "class_map", f"expected an object or null, got {type(class_map).__name__}")
        labels = []
        for wnid, label in class_map.items():
            if isinstance(label, bool) or not isinstance(label, int):
                raise _fail(where, f"class_map.{wnid}", f"expected an integer label, got {label!r}")
            labels.append(label)
        if sorted(labels) != list(range(len(labels))):
            raise _fail(where, "class_map", "labels must be 0..C-1, each used once")
    skipped = _need(doc, "skipped", (list,), where)
    max_pixels = _need(doc, "max_image_pixels", (int,), where) if "max_image_pixels" in doc else DEFAULT_MAX_PIXELS
    if max_pixels < 1:
        raise _fail(where, "max_image_pixels", f"must be >= 1, got {max_pixels}")
    for i, s in enumerate(skipped):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("reason"), str)):
            raise _fail(where, f"skipped[{i}]", f"expected {{'name': str, 'reason': str}}, got {s!r}")
    return Manifest(
        name=name,
        shard_size=shard_size,
        total=total,
        shards=tuple(shards),
        class_map=None if class_map is None else dict(class_map),
        skipped=tuple({"name": s["name"], "reason": s["reason"]} for s in skipped),
        source=_need(doc, "source", (str,), where),
        command=_need(doc, "command", (str,), where),
        created=_need(doc, "created", (str,), where),
        schema_version=version,
        max_image_pixels=max_pixels,
        path=path,
    )


def read_manifest(path_or_url: str | os.PathLike) -> Manifest:
    """Read and validate a manifest file (local path or fsspec URL).

    Every problem raises `ManifestError` naming the file and the key (e.g. `shards[3].count`).
    """
    url = os.fspath(path_or_url)
    fs, path = fs_and_path(url)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ManifestError(f"manifest {url} not found; write it with `hdpipe shard` "
                            "(e.g. `hdpipe shard --sample`)") from None
    except PermissionError:
        raise ManifestError(f"manifest {url} is not readable (permission denied)") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest {url} is not valid JSON: {e}") from None
    return manifest_from_dict(doc, where=url, path=urls.absolute(url))


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> Manifest:
    """Write `manifest` atomically (readers see the old file or the new one, never half of one).

    The document is validated first, so an invalid manifest is never written. Returns the manifest
    with `path` set to where it now lives.
    """
    url = os.fspath(path)
    doc = manifest.to_dict()
    checked = manifest_from_dict(doc, where=url, path=urls.absolute(url))
    atomic_write_bytes(url, (json.dumps(doc, indent=1) + "\n").encode())
    return checked


def sha256_of(url: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file at `url`, streamed."""
    fs, path = fs_and_path(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def verify_shards(manifest: Manifest, check_hashes: bool = True, shard_ids=None) -> None:
    """Check that every shard's tar exists and (with `check_hashes`) has the recorded sha256.

    Raises `ManifestError` naming the manifest and the first missing or changed tar.
    """
    where = manifest.path or manifest.name
    ids = range(manifest.num_shards) if shard_ids is None else shard_ids
    for k in ids:
        url = manifest.shard_url(k)
        fs, path = fs_and_path(url)
        if not fs.exists(path):
            raise ManifestError(f"manifest {where}: shard {k} tar {url} is missing; re-run `hdpipe shard` "
                                "or fix the shard URLs")
        if check_hashes:
            try:
                got = sha256_of(url)
            except PermissionError:
                raise ManifestError(f"manifest {where}: shard {k} tar {url} is not readable "
                                    "(permission denied)") from None
            if got != manifest.shards[k].sha256:
                raise ManifestError(f"manifest {where}: shard {k} tar {url} has sha256 {got[:16]}..., manifest "
                                    f"records {manifest.shards[k].sha256[:16]}...: the tar changed since it was "
                                    "indexed; re-run `hdpipe shard` (with --overwrite)")
