"""Stage two's data path: tar shards joined with Zarr target shards, one whole shard at a time.

`build_loader(cfg, epoch, rank, world_size, skip_batches=0)` returns an iterable of batches
(dicts of tensors); `steps_per_epoch(cfg, world_size)` is how many every rank yields.

Batch (B = `cfg.batch_size`, P = patches, n_keep kept patches, T = 1 + n_keep tokens in
[CLS] + kept order, L = number of relation layers asked for, Ht/Dt the teacher's heads/width):
    image         float32 [B, 3, img_size, img_size]  the stored view replayed, student-normalized
    keep_index    int64   [B, n_keep]  sorted kept patch indices (0-based, CLS excluded)
    index         int64   [B]          global sample index (the tar `__key__`)
    view          int64   [B]          view id in [0, V) chosen for this epoch
    relations     float32 [B, L, Ht, T, T]  raw Q·Kᵀ (mim_target=relations)
    attention     float32 [B, L, Ht, T, T]  softmax(R·d^-0.5) over the T tokens (mim_target=attention)
    block_features float32 [B, L, T, Dt]    teacher block outputs (mim_target=block_features)
    features      float32 [B, T, Dt]   raw final-norm teacher tokens (disc store given)
Exactly one of relations/attention/block_features is present, when `mim_store` is given and
`relation_layers` is not empty; `masking: none` gives n_keep = P.

How an epoch is planned (a pure function of cfg, epoch, rank, world_size and the stores' `valid`
rows; see `plan_epoch`):
1. Shard order: `default_rng([seed, epoch]).permutation(n_shards)`; rank r takes the shards at
   positions r, r + W, r + 2W, ... of that order (disjoint across ranks, whole shards).
2. Within the rank, worker w (of max(1, num_workers)) takes the rank's shards w, w + nw, ...; its
   sample stream is its shards in that order, each shard's valid rows permuted by
   `default_rng([seed, epoch, k])`. Every shard is read whole by exactly one process:
   `iter_shard` for the images and `store.read_shard(k)` for the targets (never one random Zarr
   read per sample), joined on the global index.
3. Batches: each worker's stream is cut into full batches of B; the rank's batch order takes them
   round-robin over workers (w0's first, w1's first, ..., w0's second, ...); then the workers'
   leftovers (< B each), concatenated in worker order, make the last batches (assembled in the main
   process from the workers' pieces). The list is cut to `steps_per_epoch` batches.
4. View per sample and epoch: `default_rng([seed, epoch, index]).integers(V)`; its stored crop box
   and flip (`views` array) are replayed with `pipeline.views.render` at the student's img_size.

Guarantees:
- Every rank yields exactly `steps_per_epoch(cfg, world_size)` batches (no DDP hang at epoch end).
  That count depends only on the manifest and the stores' valid rows, not on the epoch: it is
  (sum of the m smallest per-shard valid counts) // B with m = n_shards // W, a lower bound of
  every rank's sample count in every epoch, since each rank gets at least m whole shards. The
  samples beyond it are dropped for that epoch (different ones each epoch).
- Within an epoch, samples are disjoint across ranks and each sample is yielded at most once.
- Memory: a worker holds one shard's targets at a time, decoded to float32 (S x V x per-view
  bytes; shard size S is chosen at `hdpipe shard` time), plus `prefetch_factor` pieces.
- Batch j depends only on (cfg, epoch, rank, world_size), never on worker timing: the main process
  reassembles worker output by its plan position. `build_loader(..., skip_batches=k)` yields exactly
  batches k, k+1, ... of the full epoch, bit for bit, so a run resumes mid-epoch from the number of
  batches it consumed. The plan includes `num_workers` (the worker split decides the batches), so a
  resume must use the same loader config and world size, which the checkpointed config ensures.

Targets: a store built with `tokens: kept` holds [CLS] + keep_progressive rows already (only
masking `progressive` can be served); a store built with `tokens: all` serves every masking: the
kept tokens' rows and columns ([0] + 1 + keep_index) are gathered at load time. Gathered
`attention` rows are renormalized over the kept tokens (softmax restricted to a subset), so a
`tokens: all` store and a `tokens: kept` store give the same targets for the same mask.
"""
from __future__ import annotations

import functools
import io
import json
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import ConfigError, ShardError, StoreError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASKINGS = ("progressive", "direct", "random", "none")
MIM_TARGETS = ("relations", "attention", "block_features")


@dataclass(frozen=True)
class LoaderConfig:
    manifest: str  # path or URL of the dataset manifest JSON written by `hdpipe shard`
    mim_store: str | None = None  # URL of the MIM teacher's store (views, masks, relations); None: views/masks from the MIM store the disc store records, no MIM targets
    disc_store: str | None = None  # URL of the discriminative teacher's store (features); None = no feature targets
    batch_size: int = 64  # samples per batch on each rank (global batch = batch_size * world_size)
    num_workers: int = 4  # DataLoader worker processes per rank (0 = decode in the main process); part of the epoch plan
    seed: int = 0  # seeds shard order, sample order and view choice (with the epoch) and random masks (with index, view)
    img_size: int = 224  # student input side in pixels; the stored view is rendered at this size
    mean: tuple[float, float, float] = IMAGENET_MEAN  # student's per-channel normalization mean (RGB, 0-1 scale)
    std: tuple[float, float, float] = IMAGENET_STD  # student's per-channel normalization std (RGB, 0-1 scale)
    interpolation: str = "bicubic"  # resize filter for rendering the view (bilinear|bicubic|nearest|...)
    masking: Literal["progressive", "direct", "random", "none"] = "progressive"  # which kept-token set the student sees
    relation_layers: tuple[int, ...] | None = None  # 1-based teacher blocks to load from the MIM store; None = all stored, () = none (views/masks only)
    mim_target: Literal["relations", "attention", "block_features"] = "relations"  # which MIM store array becomes the MIM target
    pin_memory: bool = True  # pin batches in page-locked memory when CUDA is available (ignored on CPU)
    prefetch_factor: int = 2  # items each worker prepares ahead (num_workers > 0 only)
    drop_last: bool = True  # cut every rank to the same whole number of batches; False only for world_size 1 (adds the last partial batch)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"loader batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"loader num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"loader prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.img_size < 1:
            raise ConfigError(f"loader img_size must be >= 1, got {self.img_size}")
        if self.masking not in MASKINGS:
            raise ConfigError(f"loader masking must be one of {list(MASKINGS)}, got {self.masking!r}")
        if self.mim_target not in MIM_TARGETS:
            raise ConfigError(f"loader mim_target must be one of {list(MIM_TARGETS)}, got {self.mim_target!r}")
        if self.mim_store is None and self.disc_store is None:
            raise ConfigError("loader needs at least one target store: set mim_store and/or disc_store")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"loader mean/std must be 3 values with std > 0, got {self.mean} / {self.std}")


# ---------------------------------------------------------------------------------------------
# Stores: open, check against each other and the manifest, describe what a batch will hold.


@dataclass(frozen=True)
class _Sources:
    """What the checks found: which store provides what, and the token geometry."""

    view_store: str  # URL of the store whose `views` / `keep_*` arrays are replayed
    tokens: str  # "kept" | "all": the stores' token set
    num_patches: int  # P: patch tokens of the teacher grid
    n_keep: int  # kept patches per view (from the stored masks)
    num_views: int  # V stored views per sample
    layer_pos: tuple[int, ...]  # positions in the MIM store's layer axis of cfg's relation layers
    mim_array: str | None  # MIM store array to load (None when no MIM targets are asked for)
    valid_stores: tuple[str, ...]  # stores whose `valid` rows are ANDed


def _extract_hint(cfg: LoaderConfig, attrs: dict, url: str, overwrite: bool = False, **change: str) -> str:
    """The `hdpipe extract` command that (re)builds the store at `url` as its attributes describe,
    with the flags in `change` (e.g. tokens="all") swapped in: the user copies it as it is."""
    role = attrs.get("role", "mim")
    flags: dict[str, str | None] = {"teacher": attrs.get("teacher", "<teacher>"), "role": role,
                                    "manifest": cfg.manifest, "out": url}
    if attrs.get("checkpoint"):
        flags["checkpoint"] = str(attrs["checkpoint"])
    if attrs.get("random_init"):
        flags["random-init"] = None
        flags["seed"] = str(attrs.get("init_seed", 0))
    if attrs.get("model_kwargs"):
        flags["model-kwargs"] = "'" + json.dumps(attrs["model_kwargs"], sort_keys=True) + "'"
    if role == "mim":
        plan = attrs.get("view_plan") or {}
        if "seed" in plan:
            flags["seed"] = str(plan["seed"])
        if "views" in plan:
            flags["views"] = str(plan["views"])
        flags["tokens"] = str(attrs.get("tokens", "kept"))
        if attrs.get("relation_layers"):
            flags["relation-layers"] = ",".join(str(x) for x in attrs["relation_layers"])
        if attrs.get("extra_targets"):
            flags["extra-targets"] = ",".join(attrs["extra_targets"])
    elif attrs.get("mim_store"):
        flags["mim-store"] = str(attrs["mim_store"])
    if attrs.get("precision"):
        flags["precision"] = str(attrs["precision"])
    flags.update({k.replace("_", "-"): v for k, v in change.items()})
    parts = ["hdpipe extract"] + [f"--{k}" if v is None else f"--{k} {v}" for k, v in flags.items()]
    return " ".join(parts + (["--overwrite"] if overwrite else []))


def _open_store(url: str):
    from pipeline.store import TargetStore

    return TargetStore.open(url)


def _teacher(attrs: dict) -> str:
    return str(attrs.get("teacher", "<teacher>"))


def _relation_layers(attrs: dict) -> tuple[int, ...]:
    """The MIM store's relation layers (resolved 1-based block numbers, in stored axis order)."""
    return tuple(int(x) for x in attrs.get("relation_layers", ()))


@functools.lru_cache(maxsize=16)
def _check(cfg: LoaderConfig) -> _Sources:
    """Open the stores, refuse incomplete or disagreeing ones (one StoreError naming the field)."""
    from pipeline.manifest import read_manifest

    cfg.validate()
    manifest = read_manifest(cfg.manifest)
    digest = manifest.digest()
    mim_url = cfg.mim_store
    if mim_url is None and cfg.disc_store is not None:
        # Views and masks always come from a MIM store: a features-only run (CLIP-only ablation)
        # replays the one the disc store was built against (recorded in its attributes).
        mim_url = _open_store(cfg.disc_store).attrs.get("mim_store")
        if mim_url is None:
            raise StoreError(f"disc_store {cfg.disc_store} does not record its mim_store; set mim_store")
    opened = {}
    for role, url in (("mim_store", mim_url), ("disc_store", cfg.disc_store)):
        if url is None:
            continue
        store = _open_store(url)
        teacher = _teacher(store.attrs)
        store.require_complete(_extract_hint(cfg, store.attrs, url))
        want_role = "mim" if role == "mim_store" else "disc"
        got_role = store.attrs.get("role", want_role)
        if got_role != want_role:
            raise StoreError(f"{role} {url} is a {got_role!r} store (teacher {teacher}); {role} needs a {want_role!r} one")
        got = store.attrs.get("manifest_digest")
        if got != digest:
            raise StoreError(
                f"{role} {url} was built from another manifest: manifest_digest {got!r} != {digest!r} "
                f"of {cfg.manifest}; rebuild it with `{_extract_hint(cfg, store.attrs, url, overwrite=True)}`"
            )
        opened[role] = store
    mim, disc = opened["mim_store"], opened.get("disc_store")
    if disc is not None:
        pairs = [(k, k) for k in ("view_plan_digest", "tokens", "grid", "mask")]
        pairs.append(("weights_digest", "mim_weights_digest"))  # masks come from the MIM teacher's weights
        for mim_key, disc_key in pairs:
            a, b = mim.attrs.get(mim_key), disc.attrs.get(disc_key)
            if a != b:
                raise StoreError(
                    f"stores disagree on {disc_key}: mim_store {mim_url} has {a!r}, disc_store "
                    f"{cfg.disc_store} has {b!r}; rebuild the disc store against this MIM store with "
                    f"`{_extract_hint(cfg, disc.attrs, cfg.disc_store, overwrite=True, mim_store=mim_url)}`"
                )
    attrs = mim.attrs
    tokens = str(attrs.get("tokens"))
    if tokens not in ("kept", "all"):
        raise StoreError(f"mim_store {mim_url} has token set {tokens!r}; expected 'kept' or 'all'")
    if tokens == "kept" and cfg.masking != "progressive":
        raise StoreError(
            f"masking {cfg.masking!r} needs targets for every token, but {mim_url} holds only the "
            f"progressive-kept tokens (tokens: kept); re-extract with "
            f"`{_extract_hint(cfg, attrs, mim_url, overwrite=True, tokens='all')}` (then rebuild the disc store against it)"
        )
    grid = attrs.get("grid")
    num_patches = int(np.prod(grid))
    n_keep = int(attrs["mask"]["n_keep"])
    num_views = int(attrs["view_plan"]["views"])

    layer_pos: tuple[int, ...] = ()
    mim_array = None
    if cfg.mim_store is not None:
        stored = _relation_layers(attrs)
        asked = stored if cfg.relation_layers is None else tuple(cfg.relation_layers)
        missing = [layer for layer in asked if layer not in stored]
        if missing:
            want = ",".join(str(x) for x in sorted(set(stored) | set(asked)))
            raise StoreError(
                f"relation layers {missing} are not in mim_store {mim_url} (it holds {list(stored)}); re-extract "
                f"with `{_extract_hint(cfg, attrs, mim_url, overwrite=True, relation_layers=want)}`"
            )
        layer_pos = tuple(stored.index(layer) for layer in asked)
        if asked:
            have = set(MIM_TARGETS) & set(mim.arrays)
            if cfg.mim_target not in have:
                extras = sorted((set(have) - {"relations"}) | {cfg.mim_target})
                raise StoreError(
                    f"mim_target {cfg.mim_target!r} is not stored in {mim_url} (it holds {sorted(have)}); re-extract "
                    f"with `{_extract_hint(cfg, attrs, mim_url, overwrite=True, extra_targets=','.join(extras))}`"
                )
            mim_array = cfg.mim_target
    valid_stores = tuple(u for u in (mim_url, cfg.disc_store) if u is not None)
    return _Sources(
        view_store=mim_url,
        tokens=tokens,
        num_patches=num_patches,
        n_keep=n_keep,
        num_views=num_views,
        layer_pos=layer_pos,
        mim_array=mim_array,
        valid_stores=valid_stores,
    )


@functools.lru_cache(maxsize=16)
def _valid_rows(manifest_path: str, store_urls: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """Per shard: bool [count] rows that every store marks valid.

    `valid` is one bool per sample, so the whole array is read in one call (zarr fetches its shard
    files concurrently) rather than one request per shard; cached per process for later epochs.
    """
    from pipeline.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    ok = np.ones(manifest.total, dtype=bool)
    for url in store_urls:
        store = _open_store(url)
        if store.total != manifest.total:
            raise StoreError(f"store {url} has {store.total} samples, manifest {manifest_path} has {manifest.total}")
        ok &= np.asarray(store.read_rows(np.arange(manifest.total), names=["valid"])["valid"], dtype=bool)
    return tuple(ok[s.first_index : s.first_index + s.count] for s in manifest.shards)


def _valid(cfg: LoaderConfig) -> tuple[np.ndarray, ...]:
    src = _check(cfg)
    return _valid_rows(cfg.manifest, src.valid_stores)


def steps_per_epoch(cfg: LoaderConfig, world_size: int) -> int:
    """Batches every rank yields per epoch, identical on every rank and in every epoch.

    (sum of the m smallest per-shard valid counts) // batch_size with m = n_shards // world_size:
    each rank gets at least m whole shards in every epoch, so it always has that many samples.
    With drop_last=False (world_size 1 only) the last partial batch counts too.
    """
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    counts = sorted(int(v.sum()) for v in _valid(cfg))
    if not cfg.drop_last and world_size != 1:
        raise ConfigError("loader drop_last=False gives ranks unequal step counts; it is allowed only with world_size 1")
    m = len(counts) // world_size
    if m == 0:
        raise ConfigError(
            f"manifest {cfg.manifest} has {len(counts)} shards for {world_size} ranks: every rank needs "
            f"at least one whole shard; re-shard with a smaller shard_size"
        )
    least = sum(counts[:m])
    steps = least // cfg.batch_size if cfg.drop_last else -(-least // cfg.batch_size)
    if steps == 0:
        raise ConfigError(
            f"loader batch_size {cfg.batch_size} exceeds the {least} valid samples a rank is sure to get "
            f"({m} of the {len(counts)} shards of {cfg.manifest} over {world_size} ranks); lower batch_size"
        )
    return steps


# ---------------------------------------------------------------------------------------------
# The epoch plan: pure numpy, computed identically in every process.


@dataclass(frozen=True)
class _WorkerStream:
    shards: tuple[int, ...]  # shard ids in stream order
    offsets: tuple[int, ...]  # stream position where each shard starts (len(shards) + 1 entries)
    rows: np.ndarray  # int64 [n] global indices in stream order (valid rows only)


@dataclass(frozen=True)
class EpochPlan:
    """Which samples each worker streams and how their pieces form the rank's batches."""

    epoch: int
    rank: int
    world_size: int
    workers: tuple[_WorkerStream, ...]
    # batches[j] = ((worker, start, end), ...): stream slices concatenated into batch j.
    batches: tuple[tuple[tuple[int, int, int], ...], ...] = field(repr=False)

    def indices(self, j: int) -> np.ndarray:
        """Global indices of batch j (for tests and logging)."""
        return np.concatenate([self.workers[w].rows[s:e] for w, s, e in self.batches[j]])


def shard_order(seed: int, epoch: int, n_shards: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_shards)


def choose_view(seed: int, epoch: int, index: int, num_views: int) -> int:
    """The view id sample `index` shows in `epoch` (uniform over the V stored views)."""
    if num_views == 1:
        return 0
    return int(np.random.default_rng([seed, epoch, index]).integers(num_views))


def plan_epoch(cfg: LoaderConfig, epoch: int, rank: int, world_size: int, skip_batches: int = 0) -> EpochPlan:
    """The deterministic plan of one rank's epoch (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    from pipeline.manifest import read_manifest

    manifest = read_manifest(cfg.manifest)
    valid = _valid(cfg)
    steps = steps_per_epoch(cfg, world_size)
    if not 0 <= skip_batches <= steps:
        raise ConfigError(f"skip_batches {skip_batches} is outside the epoch's {steps} batches")
    order = shard_order(cfg.seed, epoch, len(manifest.shards))
    mine = [int(k) for k in order[rank::world_size]]
    nw = max(1, cfg.num_workers)
    workers = []
    for w in range(nw):
        shards = tuple(mine[w::nw])
        rows, offsets = [], [0]
        for k in shards:
            first = manifest.shards[k].first_index
            local = np.flatnonzero(valid[k])
            perm = np.random.default_rng([cfg.seed, epoch, k]).permutation(local.size)
            rows.append(first + local[perm])
            offsets.append(offsets[-1] + local.size)
        flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        workers.append(_WorkerStream(shards=shards, offsets=tuple(offsets), rows=flat))
    B = cfg.batch_size
    full = [ws.rows.size // B for ws in workers]
    batches: list[tuple[tuple[int, int, int], ...]] = []
    for i in range(max(full, default=0)):
        for w in range(nw):
            if i < full[w]:
                batches.append(((w, i * B, (i + 1) * B),))
    # Leftovers (< B per worker), concatenated in worker order, cut into batches across workers.
    current: list[tuple[int, int, int]] = []
    filled = 0
    for w, ws in enumerate(workers):
        start = full[w] * B
        while start < ws.rows.size:
            take = min(B - filled, ws.rows.size - start)
            current.append((w, start, start + take))
            filled += take
            start += take
            if filled == B:
                batches.append(tuple(current))
                current, filled = [], 0
    if current and not cfg.drop_last:
        batches.append(tuple(current))
    if len(batches) < steps:
        raise AssertionError(f"plan has {len(batches)} batches, fewer than steps_per_epoch {steps}")
    return EpochPlan(
        epoch=epoch, rank=rank, world_size=world_size, workers=tuple(workers), batches=tuple(batches[skip_batches:steps])
    )


# ---------------------------------------------------------------------------------------------
# Worker side: read whole shards, replay views, gather targets, emit plan pieces.


class _ShardTargets:
    """One shard's arrays from every store, with the per-sample gather."""

    def __init__(self, cfg: LoaderConfig, src: _Sources, k: int, first: int, count: int):
        self.cfg, self.src, self.first = cfg, src, first
        # Only the arrays this masking reads: each costs one Zarr request per shard.
        view_names = ["views"] + {"progressive": ["keep_progressive"], "direct": ["keep_direct"]}.get(cfg.masking, [])
        self.view_arrays = _store(src.view_store).read_shard(k, names=view_names)
        self.mim = None
        if src.mim_array is not None:
            self.mim = _store(cfg.mim_store).read_shard(k, names=[src.mim_array])[src.mim_array]
        self.features = None
        if cfg.disc_store is not None:
            self.features = _store(cfg.disc_store).read_shard(k, names=["features"])["features"]
        for name, arr in [*self.view_arrays.items(), ("mim", self.mim), ("features", self.features)]:
            if arr is not None and arr.shape[0] != count:
                raise StoreError(f"store shard {k} array {name} has {arr.shape[0]} rows, manifest says {count}")

    def keep(self, local: int, index: int, view: int) -> np.ndarray:
        """int64 [n_keep] (or [P] for masking none) sorted kept patch indices."""
        masking = self.cfg.masking
        if masking == "progressive":
            return np.asarray(self.view_arrays["keep_progressive"][local, view], dtype=np.int64)
        if masking == "direct":
            return np.asarray(self.view_arrays["keep_direct"][local, view], dtype=np.int64)
        if masking == "random":
            from pipeline.masking import random_keep

            out = random_keep(
                np.array([index]), np.array([view]), self.src.num_patches, self.src.n_keep, self.cfg.seed
            )
            return np.asarray(out, dtype=np.int64).reshape(-1)
        return np.arange(self.src.num_patches, dtype=np.int64)

    def sample(self, local: int, index: int, view: int) -> dict[str, np.ndarray]:
        keep = self.keep(local, index, view)
        out = {"keep_index": keep}
        # Token positions inside the stored token axis: a kept-token store is [CLS]+kept already.
        tok = None if self.src.tokens == "kept" else np.concatenate([[0], keep + 1])
        if self.mim is not None:
            arr = self.mim[local, view][list(self.src.layer_pos)]  # [L, H, Ts, Ts] or [L, Ts, D]
            if tok is not None:
                if self.src.mim_array == "block_features":
                    arr = arr[:, tok]
                else:
                    arr = arr[:, :, tok[:, None], tok[None, :]]
                if self.src.mim_array == "attention":
                    # A tokens:all store holds softmax over every token; renormalizing the kept
                    # columns gives exactly the softmax over [CLS]+kept, i.e. what a tokens:kept
                    # store holds (and what a student seeing only those tokens can match).
                    arr = arr / arr.sum(axis=-1, keepdims=True)
            out[self.src.mim_array] = np.asarray(arr, dtype=np.float32)
        if self.features is not None:
            arr = self.features[local, view]  # [Ts, D]
            if tok is not None:
                arr = arr[tok]
            out["features"] = np.asarray(arr, dtype=np.float32)
        return out

    def view_box(self, local: int, view: int):
        from pipeline.views import View

        return View.from_row(self.view_arrays["views"][local, view])


def _store(url: str):
    """The store at `url`, opened once per process: a forked DataLoader worker opens its own
    rather than reuse the parent's handles (fsspec/zarr I/O state is not fork-safe for remote URLs)."""
    return _store_in(url, os.getpid())


@functools.lru_cache(maxsize=16)
def _store_in(url: str, pid: int):
    return _open_store(url)


def _decode_image(data: bytes, index: int, url: str):
    """PIL RGB image from the tar's stored bytes (JPEG/PNG/WebP)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # The stores marked this row valid, so their teachers read it: the tar changed since.
        raise ShardError(
            f"image {index:09d} in {url} does not decode ({type(e).__name__}: {e}) although the target "
            "stores hold it as valid; the tar no longer matches the one extracted (re-run `hdpipe shard` "
            "and `hdpipe extract`)"
        ) from None


def _stack(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    keys = samples[0].keys()
    out = {}
    for key in keys:
        vals = [s[key] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        else:
            out[key] = torch.from_numpy(np.stack(vals))
    return out


class _PlanDataset(IterableDataset):
    """Each DataLoader worker streams its own shards and emits the plan's pieces in order."""

    def __init__(self, cfg: LoaderConfig, src: _Sources, plan: EpochPlan):
        super().__init__()
        self.cfg, self.src, self.plan = cfg, src, plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()  # None in the main process (num_workers 0): stream 0
        yield from self._pieces(0 if info is None else info.id)

    def _pieces(self, w: int) -> Iterator[dict[str, Any]]:
        from pipeline.data import iter_shard
        from pipeline.manifest import read_manifest
        from pipeline.views import render

        cfg, src = self.cfg, self.src
        stream = self.plan.workers[w]
        wanted = sorted((s, e) for ww, s, e in (p for b in self.plan.batches for p in b) if ww == w)
        if not wanted:
            return
        manifest = read_manifest(cfg.manifest)
        mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
        piece = 0
        samples: list[dict[str, Any]] = []
        for si, k in enumerate(stream.shards):
            lo, hi = stream.offsets[si], stream.offsets[si + 1]
            # Positions of this shard's stream range that some piece needs.
            need = [(max(s, lo), min(e, hi)) for s, e in wanted[piece:] if s < hi and e > lo]
            if not need:
                continue
            info = manifest.shards[k]
            rows = stream.rows[lo:hi]
            needed_idx = set(int(i) for a, b in need for i in stream.rows[a:b])
            # Raw bytes for the whole shard, decoded only for the rows this worker needs (rows
            # that extraction marked invalid may not decode at all).
            images = {}
            expect = info.first_index
            for rec in iter_shard(manifest, k, decode=False):
                idx = int(rec["index"])
                if idx != expect:
                    raise ShardError(f"tar shard {k} yields index {idx} where {expect} was expected: join broken")
                expect += 1
                if idx in needed_idx:
                    images[idx] = rec["image"]
            if expect != info.first_index + info.count:
                raise ShardError(f"tar shard {k} holds {expect - info.first_index} samples, manifest says {info.count}")
            targets = _ShardTargets(cfg, src, k, info.first_index, info.count)
            for pos in range(lo, hi):
                while piece < len(wanted) and wanted[piece][1] <= pos:
                    piece += 1
                if piece == len(wanted):
                    break
                s, e = wanted[piece]
                if pos < s:
                    continue
                index = int(rows[pos - lo])
                local = index - info.first_index
                view = choose_view(cfg.seed, self.plan.epoch, index, src.num_views)
                image = _decode_image(images.pop(index), index, manifest.shard_url(k))
                img = render(image, targets.view_box(local, view), cfg.img_size, cfg.interpolation)
                rec = targets.sample(local, view=view, index=index)
                rec["image"] = (img.float() - mean) / std
                rec["index"] = np.int64(index)
                rec["view"] = np.int64(view)
                samples.append(rec)
                if pos + 1 == e:
                    out = _stack(samples)
                    out["_piece"] = torch.tensor([w, s, e], dtype=torch.int64)
                    yield out
                    samples = []
            del images, targets


# ---------------------------------------------------------------------------------------------
# Main-process side: the DataLoader and the reassembly of batches in plan order.


class EpochLoader:
    """Iterable over one rank's batches of one epoch; `len()` is the number it will yield."""

    def __init__(self, cfg: LoaderConfig, plan: EpochPlan, src: _Sources):
        self.cfg, self.plan, self.src = cfg, plan, src
        cuda = torch.cuda.is_available()
        self.pin = cfg.pin_memory and cuda
        kwargs: dict[str, Any] = {}
        if cfg.num_workers > 0:
            kwargs["prefetch_factor"] = cfg.prefetch_factor
        self._loader = DataLoader(
            _PlanDataset(cfg, src, plan),
            batch_size=None,  # workers emit whole pieces; batching happens in the plan
            num_workers=cfg.num_workers,
            pin_memory=self.pin,
            persistent_workers=False,  # every epoch has a new plan
            **kwargs,
        )

    def __len__(self) -> int:
        return len(self.plan.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.plan.batches:
            return
        queues: dict[int, deque] = {w: deque() for w in range(len(self.plan.workers))}
        it = iter(self._loader)
        for segments in self.plan.batches:
            parts = []
            for w, s, e in segments:
                while not queues[w]:
                    item = next(it)
                    queues[int(item["_piece"][0])].append(item)
                item = queues[w].popleft()
                got = tuple(int(x) for x in item.pop("_piece"))
                if got != (w, s, e):
                    raise AssertionError(f"loader piece {got} arrived where {(w, s, e)} was planned")
                parts.append(item)
            if len(parts) == 1:
                yield parts[0]
            else:
                batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                if self.pin:
                    batch = {key: v.pin_memory() for key, v in batch.items()}
                yield batch


def build_loader(
    cfg: LoaderConfig, epoch: int, rank: int = 0, world_size: int = 1, skip_batches: int = 0
) -> EpochLoader:
    """One rank's batches of `epoch`: exactly steps_per_epoch(cfg, world_size) - skip_batches of them.

    Checks the stores first (complete, same manifest, view plan and token set, relation layers and
    MIM target stored, masking servable) and raises StoreError naming the field and the extract
    command that fixes it. Batch j is a pure function of (cfg, epoch, rank, world_size): see the
    module docstring for the plan and the resume guarantee.
    """
    src = _check(cfg)
    plan = plan_epoch(cfg, epoch, rank, world_size, skip_batches)
    return EpochLoader(cfg, plan, src)

