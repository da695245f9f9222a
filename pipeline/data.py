"""Reading tar shards back: one whole shard in index order, or a webdataset pipeline over many.

Both yield the same dicts (docs/ARCHITECTURE.md "Samples and shards"):

    {"index": int,            # global sample index
     "label": int,            # class label, -1 when the dataset is unlabeled
     "name": str,             # original relative path of the image
     "image": PIL.Image (RGB) # or the stored encoded bytes with decode=False
    }

The index of a sample is `first_index + position in its tar` (the manifest fixes first_index).
Tars written by `hdpipe shard` also carry it in `__key__` and `<key>.json`; when they do, it is
checked, so a tar swapped for another is caught. Tars indexed with `hdpipe shard --urls` (written
by other tools) need not follow our key scheme: their samples are numbered by position.

Splitting (`shard_dataset`): whole shards are dealt round-robin first over ranks (RANK/WORLD_SIZE
environment or torch.distributed), then over DataLoader workers, exactly as webdataset's
`split_by_node`/`split_by_worker`. A rank or worker that would get no shard raises `ShardError`
naming the counts instead of silently yielding nothing.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.errors import ManifestError, ShardError
from pipeline.fsio import fs_and_path
from pipeline.manifest import Manifest, verify_shards

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")

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


def to_record(sample: dict[str, Any], index: int, url: str, decode: bool) -> dict[str, Any]:
    """One raw webdataset sample -> {"index", "label", "name", "image"} (checks the stored index)."""
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
    if "cls" in sample:
        label = int(sample["cls"].decode("ascii").strip())
    elif isinstance(meta.get("label"), int):
        label = meta["label"]
    else:
        label = -1
    ext = _image_ext(sample)
    if ext is None:
        raise ShardError(f"{url}: sample {sample['__key__']} has no image member (looked for {IMAGE_EXTS})")
    data = sample[ext]
    name = meta.get("name") if isinstance(meta.get("name"), str) else sample["__key__"]
    if decode:
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = im.convert("RGB")
        except Exception as e:
            raise ShardError(f"{url}: sample {sample['__key__']} ({name}) does not decode: {e}") from None
    else:
        image = data
    return {"index": index, "label": label, "name": name, "image": image}


def _open(url: str):
    fs, path = fs_and_path(url)
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise ManifestError(f"shard tar {url} is missing; re-run `hdpipe shard` or fix the manifest's URLs") from None
    except PermissionError:
        raise ShardError(f"shard tar {url} is not readable (permission denied)") from None


def _indexed_samples(url: str, first_index: int, count: int, decode: bool) -> Iterator[dict[str, Any]]:
    n = 0
    with _open(url) as f:
        for sample in tar_samples(f, url):
            if n >= count:
                raise ManifestError(f"{url} holds more than the {count} samples its manifest records")
            yield to_record(sample, first_index + n, url, decode)
            n += 1
    if n != count:
        raise ManifestError(f"{url} holds {n} samples but its manifest records {count}")


def iter_shard(manifest: Manifest, k: int, decode: bool = True) -> Iterator[dict[str, Any]]:
    """Every sample of shard k in index order: dicts {"index", "label", "name", "image"}.

    `image` is a PIL RGB image, or the stored bytes (JPEG/PNG/WebP, untouched) with decode=False.
    """
    if not 0 <= k < manifest.num_shards:
        raise ManifestError(f"shard {k} outside 0..{manifest.num_shards - 1} of manifest {manifest.path or manifest.name}")
    info = manifest.shards[k]
    yield from _indexed_samples(manifest.shard_url(k), info.first_index, info.count, decode)


# ---- webdataset pipeline -------------------------------------------------------------------


def split_by_node_checked(src: Iterable[dict], group=None) -> Iterator[dict]:
    """webdataset's split_by_node, but a rank that gets no shard is an error, not an empty epoch."""
    urls = list(src)
    rank, world, _, _ = wds.utils.pytorch_worker_info(group=group)
    mine = urls[rank::world] if world > 1 else urls
    if not mine:
        raise ShardError(f"rank {rank} of world size {world} gets no shard: {len(urls)} shards cannot be split "
                         f"over {world} ranks; use at most {len(urls)} ranks or shard the data with a smaller "
                         "--shard-size")
    yield from mine


def split_by_worker_checked(src: Iterable[dict]) -> Iterator[dict]:
    """webdataset's split_by_worker, but a worker that gets no shard is an error."""
    urls = list(src)
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    mine = urls[worker::workers] if workers > 1 else urls
    if not mine:
        raise ShardError(f"DataLoader worker {worker} of {workers} (rank {rank}) gets no shard: this rank has "
                         f"{len(urls)} shard(s) for {workers} workers; use num_workers <= {len(urls)}")
    yield from mine


class _IndexedTarSamples:
    """Pipeline stage: {"url", "first_index", "count"} items -> indexed sample dicts (not decoded)."""

    def __call__(self, src: Iterable[dict]) -> Iterator[dict[str, Any]]:
        for item in src:
            yield from _indexed_samples(item["url"], item["first_index"], item["count"], decode=False)


def _decode_record(rec: dict[str, Any]) -> dict[str, Any]:
    try:
        with Image.open(io.BytesIO(rec["image"])) as im:
            image = im.convert("RGB")
    except Exception as e:
        raise ShardError(f"sample {rec['index']} ({rec['name']}) does not decode: {e}") from None
    return {**rec, "image": image}


class _ShardItems:
    """Source stage: the shard items {"url", "first_index", "count"} (SimpleShardList carries only URLs)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __call__(self) -> Iterator[dict]:
        return (dict(item) for item in self.items)


class ShardDataset(wds.DataPipeline, wds.FluidInterface):
    """A webdataset pipeline (an `IterableDataset`) with webdataset's fluid methods (.map, .batched...)."""


def shard_dataset(manifest: Manifest, shard_ids: Sequence[int] | None = None, shuffle: int = 0, seed: int = 0,
                  decode: bool = True, shuffle_shards: bool = False, split: bool = True) -> ShardDataset:
    """The webdataset pipeline over shards `shard_ids` (default: all) yielding iter_shard's dicts.

    shuffle: sample shuffle buffer size (0 = keep index order within each worker's stream).
    seed: seeds the shard order (shuffle_shards) and the sample buffer, identically on every rank.
    shuffle_shards: permute the shard list (same permutation on every rank, so splits stay disjoint).
    split: deal shards over ranks (RANK/WORLD_SIZE or torch.distributed) and DataLoader workers;
        False gives every reader every shard (e.g. evaluation on one process).

    Shards missing on disk are reported (naming the tar) when the pipeline is built, not mid-epoch.
    """
    ids = list(range(manifest.num_shards)) if shard_ids is None else [int(k) for k in shard_ids]
    if not ids:
        raise ShardError(f"no shards selected from manifest {manifest.path or manifest.name}")
    for k in ids:
        if not 0 <= k < manifest.num_shards:
            raise ManifestError(f"shard {k} outside 0..{manifest.num_shards - 1} of manifest {manifest.path or manifest.name}")
    verify_shards(manifest, check_hashes=False, shard_ids=ids)
    if shuffle_shards:
        ids = [ids[i] for i in np.random.default_rng([seed, 1]).permutation(len(ids))]
    items = [{"url": manifest.shard_url(k), "first_index": manifest.shards[k].first_index,
              "count": manifest.shards[k].count} for k in ids]
    stages: list[Any] = [_ShardItems(items)]
    if split:
        stages += [split_by_node_checked, split_by_worker_checked]
    stages.append(_IndexedTarSamples())
    if shuffle > 0:
        stages.append(wds.filters.shuffle(shuffle, initial=min(shuffle, 100), seed=seed))
    if decode:
        stages.append(wds.filters.map(_decode_record))
    return ShardDataset(*stages)

