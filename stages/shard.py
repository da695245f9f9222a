"""Stage one: images -> deterministic webdataset tar shards + a dataset manifest.

    hdpipe shard --sample                                   # bundled sample: 3 manifests, no download
    hdpipe shard --input /data/imagenet/train --name imagenet-train --workers 2
    hdpipe shard --input photos/ --name photos --on-error skip
    hdpipe shard --urls 'data/x-{000000..000003}.tar' --name x   # index existing tars

Inputs (exactly one of `input`, `urls`, `sample`):
- a folder with sub-folders -> labeled ImageNet-style tree `<input>/<class>/**/*`; labels are the
  sorted class-folder names (0..C-1), saved as the manifest's `class_map`. Give the split folder
  (`.../train`), not the dataset root.
- a folder of files only -> unlabeled (label -1 when read).
- `urls`: existing webdataset tars (a text file with one URL/path per line, or a brace pattern).
  They are only indexed (count, sha256, first_index), never rewritten. Their global indices are
  defined by position: the tars in the given order, samples in tar order, numbered from 0. All tars
  but the last must hold the same number of samples (that number becomes shard_size) so that target
  store shards line up with tar shards. Their images are not decoded here; readers decode them with
  the `max_image_pixels` the manifest records.
- `sample`: the bundled sample (pipeline/sample.py) -> `<manifest>`, `<manifest stem>-probe-train`
  and `-probe-test` manifests.

Every input file is read, its format sniffed from magic bytes and fully decoded with Pillow (with a
decompression-bomb pixel limit) before it is written; JPEGs are stored byte-for-byte.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from pipeline.data.images import DEFAULT_MAX_PIXELS
from pipeline.data.inputs import prepared, scan_folder
from pipeline.data.manifest import Manifest, ShardInfo, write_manifest
from pipeline.data.tars import refuse_existing, remove_stale, write_dataset
from pipeline.errors import ConfigError, ManifestError, ShardError
from pipeline.urls import fs_and_path, is_remote, join, relative_to, parent

DEFAULT_SHARD_SIZE = 1024  # images per tar for folders: ~110 MB of ImageNet JPEGs
SAMPLE_SHARD_SIZE = 128  # the bundled sample uses small shards so stages see several (resume, splits)


@dataclass(frozen=True)
class ShardConfig:
    """Configuration of `hdpipe shard` (section `shard` of params.yaml)."""

    input: str | None = None  # image folder: class-folder tree (labeled) or flat folder (unlabeled)
    urls: str | None = None  # existing tars to index: a file with one URL per line, or a brace pattern
    sample: bool = False  # build the bundled sample (3 manifests) instead of reading `input`/`urls`
    name: str | None = None  # dataset name, tars are <name>-{k:06d}.tar; default: input folder name / "sample"
    out_dir: str = "data/shards"  # tars go to <out_dir>/<name>/ (local path or fsspec URL)
    manifest: str | None = None  # manifest path; default manifests/<name>.json
    shard_size: int | None = None  # images per tar; None = 1024 (folders), 128 (sample), as found (urls)
    # seeded shuffle of the input order (class folders would otherwise give one-class tars); False: sorted paths
    shuffle: bool = True
    seed: int = 0  # seed of `shuffle` and of the sample's crops
    on_error: Literal["fail", "skip"] = "fail"  # bad input file: stop, or leave it out and list it in the manifest
    reencode: Literal["png", "jpeg"] = "png"  # non-JPEG inputs: lossless (PNG/WebP kept, others -> PNG) or JPEG
    jpeg_quality: int = 95  # JPEG quality (1-95) used only when reencode=jpeg
    # Decompression-bomb guard (pixels): larger images are bad inputs; it replaces Pillow's own limit,
    # and the manifest records it, so every later stage decodes the images with it too.
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False  # replace existing tars/manifests instead of refusing
    workers: int = 1  # processes that read and check images (1 = in this process)
    sample_train: int = 512  # bundled sample: unlabeled training crops
    sample_probe_train: int = 20  # bundled sample: labeled probe-train crops per class (10 classes)
    sample_probe_test: int = 10  # bundled sample: labeled held-out probe-test crops per class
    progress: bool = True  # progress bar (images/s, ETA) on stderr

    def validate(self) -> None:
        given = [k for k in ("input", "urls") if getattr(self, k)] + (["sample"] if self.sample else [])
        if len(given) != 1:
            raise ConfigError("hdpipe shard needs exactly one of --input FOLDER, --urls LIST_OR_PATTERN, --sample"
                              + (f" (got {', '.join(given)})" if given else ""))
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for k in ("sample_train", "sample_probe_train", "sample_probe_test"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
            # A sample size given for a folder or URL input would be silently ignored otherwise.
            if not self.sample and getattr(self, k) != defaults[k]:
                raise ConfigError(f"{k} only applies to --sample (the bundled sample); drop it for --input/--urls")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"name {self.name!r} must be letters, digits, '_', '.', '-' (it names files)")


def shard(cfg: ShardConfig) -> Path | str:
    """Write the shards and manifest(s) described by `cfg`; returns the (training) manifest path.

    The path is a `Path` for a local manifest and the URL string for an fsspec URL (`Path` would
    collapse `s3://` into `s3:/`); `read_manifest` takes either.
    """
    cfg.validate()
    if cfg.sample:
        return _shard_sample(cfg)
    if cfg.urls:
        return _index_urls(cfg)
    return _shard_folder(cfg)


# ---- helpers shared by the three inputs ------------------------------------------------------


def _command(cfg: ShardConfig) -> str:
    """The command line equivalent to `cfg` (non-default fields only), recorded in the manifest."""
    parts = ["hdpipe shard"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "progress" or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        else:
            parts.append(f"{flag} {_quote(str(value))}")
    return " ".join(parts)


def _quote(s: str) -> str:
    return s if re.fullmatch(r"[A-Za-z0-9_./:=+-]+", s) else "'" + s.replace("'", "'\\''") + "'"


def _now() -> str:
    """UTC time for the manifest's `created`; honours SOURCE_DATE_EPOCH (the reproducible-builds
    convention) so a rebuilt manifest can be byte-identical too."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and not epoch.isdigit():
        raise ConfigError(f"environment variable SOURCE_DATE_EPOCH must be seconds since 1970, got {epoch!r}")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _manifest_url(tar_url: str, manifest_path: str) -> str:
    """The URL to record: relative to the manifest's folder when both are local, else absolute."""
    return relative_to(tar_url, parent(manifest_path))


def _as_path(manifest: str) -> Path | str:
    return manifest if is_remote(manifest) else Path(manifest)


def _default_manifest(name: str) -> str:
    return os.path.join("manifests", f"{name}.json")


def _write(records: Iterator, *, total_inputs: int, name: str, out_dir: str, manifest_path: str,
           shard_size: int, class_map: dict[str, int] | None, source: str, cfg: ShardConfig,
           overwrite: bool | None = None) -> Manifest:
    overwrite = cfg.overwrite if overwrite is None else overwrite
    t0 = time.perf_counter()
    shards, skipped, nbytes = write_dataset(records, name=name, out_dir=out_dir, shard_size=shard_size,
                                            total_inputs=total_inputs, overwrite=overwrite,
                                            on_error=cfg.on_error, progress=cfg.progress)
    if not shards:
        raise ShardError(f"no image of {source} could be written ({len(skipped)} skipped: "
                         f"{skipped[0].reason if skipped else 'no inputs'})")
    written = sum(s[1] for s in shards)
    if written + len(skipped) != total_inputs:  # every input is either a sample or a skipped entry
        raise RuntimeError(f"count mismatch: {written} written + {len(skipped)} skipped != {total_inputs} inputs")
    manifest = Manifest(
        name=name, shard_size=shard_size, total=written,
        shards=tuple(ShardInfo(url=_manifest_url(u, manifest_path), count=c, first_index=f, sha256=h)
                     for u, c, f, h in shards),
        class_map=class_map,
        skipped=tuple({"name": s.name, "reason": s.reason} for s in skipped),
        source=source, command=_command(cfg), created=_now(), max_image_pixels=cfg.max_image_pixels,
    )
    manifest = write_manifest(manifest, manifest_path)
    if overwrite:
        remove_stale(out_dir, name, len(shards))
    dt = time.perf_counter() - t0
    print(f"hdpipe shard: {name}: {written} images in {len(shards)} shards ({nbytes / 1e6:.1f} MB) in {dt:.1f} s "
          f"({written / max(dt, 1e-9):.0f} img/s), {len(skipped)} skipped -> {manifest_path}", file=sys.stderr)
    return manifest


# ---- folders ---------------------------------------------------------------------------------


def _shard_folder(cfg: ShardConfig) -> Path:
    root = os.path.normpath(cfg.input)
    files, class_map = scan_folder(root)
    name = cfg.name or os.path.basename(os.path.abspath(root))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"dataset name {name!r} (from the input folder) is not a valid file name; pass --name")
    out_dir = join(cfg.out_dir, name)
    manifest_path = cfg.manifest or _default_manifest(name)
    refuse_existing(out_dir, name, manifest_path, cfg.overwrite)
    if cfg.shuffle:
        order = np.random.default_rng(cfg.seed).permutation(len(files))
        files = [files[i] for i in order]
    # The per-sample source is the folder's name, not its absolute path, so tars do not depend on
    # where the input happens to be mounted.
    tag = os.path.basename(os.path.abspath(root))
    jobs = [(p, n, label, tag, cfg.reencode, cfg.jpeg_quality, cfg.max_image_pixels) for p, n, label in files]
    source = (f"folder {os.path.abspath(root)} ({'class folders' if class_map else 'flat'}, "
              f"{'shuffled seed ' + str(cfg.seed) if cfg.shuffle else 'sorted paths'})")
    _write(prepared(jobs, cfg.workers), total_inputs=len(jobs), name=name, out_dir=out_dir,
           manifest_path=manifest_path, shard_size=cfg.shard_size or DEFAULT_SHARD_SIZE,
           class_map=class_map, source=source, cfg=cfg)
    return _as_path(manifest_path)


# ---- the bundled sample ----------------------------------------------------------------------


def sample_manifest_paths(manifest: str) -> dict[str, str]:
    """{split: manifest path}: the training manifest and its two probe siblings."""
    stem = manifest[:-5] if manifest.endswith(".json") else manifest
    return {"train": manifest, "probe-train": f"{stem}-probe-train.json", "probe-test": f"{stem}-probe-test.json"}


def _shard_sample(cfg: ShardConfig) -> Path:
    from pipeline.data.bundled import SampleSpec, iter_split, probe_class_map, sample_state, split_sizes

    spec = SampleSpec(train_count=cfg.sample_train, probe_train_per_class=cfg.sample_probe_train,
                      probe_test_per_class=cfg.sample_probe_test, seed=cfg.seed)
    base = cfg.name or "sample"
    paths = sample_manifest_paths(cfg.manifest or _default_manifest(base))
    names = {"train": base, "probe-train": f"{base}-probe-train", "probe-test": f"{base}-probe-test"}
    shard_size = cfg.shard_size or SAMPLE_SHARD_SIZE
    sizes = split_sizes(spec)
    for split in ("train", "probe-train", "probe-test"):
        source = spec.describe(split)
        state = "absent" if cfg.overwrite else sample_state(paths[split], source, shard_size)
        if state == "intact":
            # `dvc repro` or a second `hdpipe shard --sample` lands here: same spec, tars verified.
            print(f"hdpipe shard: {paths[split]} is up to date (same sample spec, tars verified); "
                  "nothing to do (pass --overwrite to rebuild)", file=sys.stderr)
            continue
        # A damaged copy of this very sample (tar deleted or changed) is rebuilt in place: the
        # build is deterministic, so this restores exactly what the manifest describes.
        overwrite = cfg.overwrite or state == "damaged"
        if state == "damaged":
            print(f"hdpipe shard: {paths[split]}: a tar is missing or changed; rebuilding this sample",
                  file=sys.stderr)
        out_dir = join(cfg.out_dir, names[split])
        refuse_existing(out_dir, names[split], paths[split], overwrite)
        _write(iter_split(spec, split), total_inputs=sizes[split], name=names[split], out_dir=out_dir,
               manifest_path=paths[split], shard_size=shard_size,
               class_map=None if split == "train" else probe_class_map(), source=source, cfg=cfg,
               overwrite=overwrite)
    return _as_path(paths["train"])


# ---- indexing existing tars ------------------------------------------------------------------


def _index_urls(cfg: ShardConfig) -> Path:
    from tqdm import tqdm

    from pipeline.data.indexing import class_map_of, expand_urls, index_tar, merge_names

    urls = expand_urls(cfg.urls)
    first = os.path.basename(urls[0].split("://")[-1])
    name = cfg.name or re.sub(r"-?\d*\.tar$", "", first) or "dataset"
    manifest_path = cfg.manifest or _default_manifest(name)
    mfs, mpath = fs_and_path(manifest_path)
    if not cfg.overwrite and mfs.exists(mpath):
        raise ShardError(f"manifest {manifest_path} already exists; pass --overwrite to replace it "
                         "or choose --manifest")
    t0 = time.perf_counter()
    indexed, names, present = [], {}, np.zeros(0, dtype=np.int32)
    none = np.zeros(0, dtype=np.int32)
    for url in tqdm(urls, unit="tar", desc=f"index {name}", disable=not cfg.progress):
        t = index_tar(url)
        if t.count == 0:
            raise ShardError(f"tar {url} holds no samples")
        merge_names(names, t.names)
        present = np.union1d(present, t.present)
        # names and labels are kept once, for the dataset: per tar they held ~8 KB (1,000 classes),
        # 10 MB over ImageNet's 1,252 tars, 1.2x the RSS of a small run's `shard --urls`
        indexed.append(dataclasses.replace(t, names={}, present=none))
    counts, hashes = [t.count for t in indexed], [t.sha256 for t in indexed]
    class_map = class_map_of(indexed, urls, names, present)
    size = cfg.shard_size or counts[0]
    for k, (url, n) in enumerate(zip(urls, counts)):
        last = k == len(urls) - 1
        if n > size or (not last and n != size):
            raise ShardError(f"tar {url} holds {n} samples but shard_size is {size}: every tar except the last "
                             "must hold exactly shard_size samples so target-store shards line up with tars "
                             "(re-write the tars with `hdpipe shard --input FOLDER`)")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    manifest = Manifest(
        name=name, shard_size=size, total=int(sum(counts)),
        shards=tuple(ShardInfo(url=_manifest_url(u, manifest_path), count=n, first_index=int(f), sha256=h)
                     for u, n, f, h in zip(urls, counts, starts, hashes)),
        class_map=class_map, skipped=(),
        source=f"indexed existing tars {cfg.urls} (indices by position: tars in list order, samples in tar order"
               f"{'; labels from .cls/.json' if class_map else ''})",
        command=_command(cfg), created=_now(), max_image_pixels=cfg.max_image_pixels,
    )
    try:
        write_manifest(manifest, manifest_path)
    except ManifestError as e:
        raise ShardError(f"cannot index {cfg.urls}: {e}") from None
    dt = time.perf_counter() - t0
    print(f"hdpipe shard: {name}: indexed {manifest.total} samples in {len(urls)} tars in {dt:.1f} s "
          f"-> {manifest_path}", file=sys.stderr)
    return _as_path(manifest_path)
