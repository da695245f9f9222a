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
2. Within the rank, worker w (of max(1, num_workers)) takes the rank's shards w, w + nw, ...,
   grouped in that order into windows of `mix_shards` shards; its sample stream is its windows in
   order, the valid rows of each window's shards permuted together by
   `default_rng([seed, epoch, *window])`, so one batch mixes rows of `mix_shards` shards (a
   class-sorted tar does not make one-class batches). Every shard is read whole by exactly one
   process: `read_shard_records` for the images (its sha256 checked before any row is used) and
   `store.read_shard_views(k)` for the targets (never one random Zarr read per sample), joined
   on the global index.
3. Batches: each worker's stream is cut into full batches of B; the rank's batch order takes them
   round-robin over workers (w0's first, w1's first, ..., w0's second, ...); then the workers'
   leftovers (< B each), concatenated in worker order, make the last batches (assembled in the main
   process from the workers' pieces). The list is cut to `steps_per_epoch` batches.
4. View per sample and epoch: `default_rng([seed, epoch, index]).integers(V)`; its stored crop box
   and flip (`views` array) are replayed with `pipeline.data.views.render` at the student's img_size.

Guarantees:
- Every rank yields exactly `steps_per_epoch(cfg, world_size)` batches (no DDP hang at epoch end).
  That count depends only on the manifest and the stores' valid rows, not on the epoch: it is
  (sum of the m smallest per-shard valid counts) // B with m = n_shards // W, a lower bound of
  every rank's sample count in every epoch, since each rank gets at least m whole shards. The
  samples beyond it are dropped for that epoch (different ones each epoch).
- Within an epoch, samples are disjoint across ranks and each sample is yielded at most once.
- Memory: a worker holds one window at a time: `mix_shards` shards' encoded images and, per row,
  the chosen view's targets still encoded (S x one view's stored bytes per shard, whatever V is;
  rows are decoded to float32 one sample at a time), plus `prefetch_factor` pieces.
- Batch j depends only on (cfg, epoch, rank, world_size), never on worker timing: the main process
  reassembles worker output by its plan position. `build_loader(..., skip_batches=k)` yields exactly
  batches k, k+1, ... of the full epoch, bit for bit, so a run resumes mid-epoch from the number of
  batches it consumed. The plan includes `num_workers` and `mix_shards` (they decide the batches), so a
  resume must use the same loader config and world size, which the checkpointed config ensures.

Targets: a store built with `tokens: kept` holds [CLS] + keep_progressive rows already (only
masking `progressive` can be served); a store built with `tokens: all` serves every masking: the
kept tokens' rows and columns ([0] + 1 + keep_index) are gathered at load time. Gathered
`attention` rows are renormalized over the kept tokens (softmax restricted to a subset), so a
`tokens: all` store and a `tokens: kept` store give the same targets for the same mask.
"""
from __future__ import annotations

import functools
import json
import os
import posixpath
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
    mix_shards: int = 4  # shards whose rows each worker shuffles together (memory: this many shards' images and one view of targets per sample); part of the epoch plan
    drop_last: bool = True  # cut every rank to the same whole number of batches; False only for world_size 1 (adds the last partial batch)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"loader batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"loader num_workers must be >= 0, got {self.num_workers}")
        if self.mix_shards < 1:
            raise ConfigError(f"loader mix_shards must be >= 1, got {self.mix_shards}")
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
class Sources:
    """What the stores serve, checked once (`resolve_sources`): where views, masks and targets come
    from, the token geometry, and the teacher shapes a student must match. No teacher is built."""

    view_store: str  # URL of the MIM store whose `views` / `keep_*` arrays are replayed
    mim_store: str | None  # URL of the MIM targets' store (None: no MIM term)
    disc_store: str | None  # URL of the features' store (None: no feature term)
    tokens: str  # "kept" | "all": the stores' token set
    grid: tuple[int, int]  # teacher patch grid (rows, cols)
    num_patches: int  # P: patch tokens of the teacher grid
    n_keep: int  # kept patches per view (from the stored masks)
    num_views: int  # V stored views per sample
    relation_layers: tuple[int, ...]  # MIM teacher blocks (1-based) served, in batch order; () = none
    layer_pos: tuple[int, ...]  # positions of `relation_layers` in the MIM store's layer axis
    mim_array: str | None  # MIM store array served (relations|attention|block_features), None without MIM targets
    mim_depth: int | None  # MIM teacher depth L_t and head count (for the student's layer and head rules)
    mim_heads: int | None
    mim_dim: int | None  # MIM teacher width (block_features targets)
    feature_dim: int | None  # discriminative teacher width (features targets)
    valid_stores: tuple[str, ...]  # stores whose `valid` rows are ANDed


def _open_store(url: str):
    from pipeline.targets.store import TargetStore

    return TargetStore.open(url)


def _after(commands: list[str], options: str) -> str:
    """`a`, then `b`, ... then run with OPTIONS: one sentence a user can follow step by step."""
    return ", then ".join(f"`{c}`" for c in commands) + f", then run with {options}"


@functools.lru_cache(maxsize=32)
def resolve_sources(manifest_path: str, mim_store: str | None, disc_store: str | None,
                    masking: str = "progressive", relation_layers: tuple[int, ...] | None = None,
                    mim_target: str = "relations") -> Sources:
    """Open the stores and check them against the manifest, each other and what the run asks for.

    Every refusal is one StoreError naming the field; the fix-it commands come from
    `pipeline.targets.hints` and never rebuild a store in place (stage two made none of them): a store with
    other settings is written beside the old one and the run pointed at it.
    """
    from pipeline.targets.hints import extract_command, sibling_url
    from pipeline.data.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    digest = manifest.digest()
    mim_url = mim_store
    if mim_url is None and disc_store is not None:
        # Views and masks always come from a MIM store: a features-only run (CLIP-only ablation)
        # replays the one the disc store was built against (recorded in its attributes).
        mim_url = _open_store(disc_store).attrs.get("mim_store")
        if mim_url is None:
            raise StoreError(f"disc_store {disc_store} does not record its mim_store; set mim_store")
    opened = {}
    for role, url in (("mim_store", mim_url), ("disc_store", disc_store)):
        if url is None:
            continue
        store = _open_store(url)
        want_role = "mim" if role == "mim_store" else "disc"
        got_role = store.attrs.get("role", want_role)
        if got_role != want_role:
            raise StoreError(f"{role} {url} is a {got_role!r} store (teacher {store.attrs.get('teacher')}); "
                             f"{role} needs a {want_role!r} one")
        got = store.attrs.get("manifest_digest")
        if got != digest:
            if role == "mim_store":  # a new MIM store for this manifest, and a disc store against it
                new_mim = sibling_url(url, manifest.name)
                steps = [extract_command(store.attrs, manifest=manifest_path, out=new_mim)]
                options = f"--mim-store {new_mim}"
                if disc_store is not None:
                    new_disc = sibling_url(disc_store, manifest.name)
                    steps.append(extract_command(_open_store(disc_store).attrs, manifest=manifest_path,
                                                 out=new_disc, mim_store=new_mim))
                    options += f" --disc-store {new_disc}"
            else:  # the MIM store fits: a disc store for this manifest against it
                new_disc = sibling_url(url, manifest.name)
                steps = [extract_command(store.attrs, manifest=manifest_path, out=new_disc, mim_store=mim_url)]
                options = f"--disc-store {new_disc}"
            raise StoreError(
                f"{role} {url} was built from another manifest: manifest_digest {got!r} != {digest!r} of "
                f"{manifest_path}; pass the manifest it was built from, or make stores for this one: "
                + _after(steps, options))
        store.require_complete(extract_command(store.attrs, manifest=manifest_path, out=url))
        opened[role] = store
    mim, disc = opened["mim_store"], opened.get("disc_store")
    if disc is not None:
        pairs = [(k, k) for k in ("view_plan_digest", "tokens", "grid", "mask")]
        pairs.append(("weights_digest", "mim_weights_digest"))  # masks come from the MIM teacher's weights
        for mim_key, disc_key in pairs:
            a, b = mim.attrs.get(mim_key), disc.attrs.get(disc_key)
            if a != b:
                fresh = sibling_url(disc_store, "for-" + posixpath.basename(mim_url.rstrip("/"))[:-5])
                raise StoreError(
                    f"stores disagree on {disc_key}: mim_store {mim_url} has {a!r}, disc_store {disc_store} has "
                    f"{b!r}; make a disc store against this MIM store: "
                    + _after([extract_command(disc.attrs, manifest=manifest_path, out=fresh, mim_store=mim_url)],
                             f"--disc-store {fresh}"))
    attrs = mim.attrs
    tokens = str(attrs.get("tokens"))
    if tokens not in ("kept", "all"):
        raise StoreError(f"mim_store {mim_url} has token set {tokens!r}; expected 'kept' or 'all'")
    if tokens == "kept" and masking != "progressive":
        new_mim = sibling_url(mim_url, "tokens-all")
        steps = [extract_command(attrs, manifest=manifest_path, out=new_mim, tokens="all")]
        options = f"--mim-store {new_mim}"
        if disc is not None:
            new_disc = sibling_url(disc_store, "tokens-all")
            steps.append(extract_command(disc.attrs, manifest=manifest_path, out=new_disc, mim_store=new_mim))
            options += f" --disc-store {new_disc}"
        raise StoreError(
            f"masking {masking!r} needs targets for every token, but {mim_url} holds only the progressive-kept "
            f"tokens (tokens: kept); make stores of every token: " + _after(steps, options))
    grid = tuple(int(g) for g in attrs.get("grid"))
    stored = tuple(int(x) for x in attrs.get("relation_layers", ()))
    asked: tuple[int, ...] = ()
    layer_pos: tuple[int, ...] = ()
    mim_array = None
    if mim_store is not None:
        asked = stored if relation_layers is None else tuple(relation_layers)
        missing = [layer for layer in asked if layer not in stored]
        if missing:
            want = sorted(set(stored) | set(asked))
            fresh = sibling_url(mim_url, "layers-" + "-".join(map(str, want)))
            raise StoreError(
                f"relation layers {missing} are not in mim_store {mim_url} (it holds {list(stored)}); make a MIM "
                "store with them (the disc store stays valid): "
                + _after([extract_command(attrs, manifest=manifest_path, out=fresh, relation_layers=want)],
                         f"--mim-store {fresh}"))
        layer_pos = tuple(stored.index(layer) for layer in asked)
        if asked:
            have = set(MIM_TARGETS) & set(mim.arrays)
            if mim_target not in have:
                extras = sorted((have - {"relations"}) | {mim_target})
                fresh = sibling_url(mim_url, "-".join(extras))
                raise StoreError(
                    f"mim_target {mim_target!r} is not stored in {mim_url} (it holds {sorted(have)}); make a MIM "
                    "store with it (the disc store stays valid): "
                    + _after([extract_command(attrs, manifest=manifest_path, out=fresh, extra_targets=extras)],
                             f"--mim-store {fresh}"))
            mim_array = mim_target
    mim_dim = int(mim.arrays["block_features"].shape_tail[-1]) if "block_features" in mim.arrays else None
    return Sources(
        view_store=mim_url, mim_store=mim_store, disc_store=disc_store, tokens=tokens, grid=grid,
        num_patches=int(np.prod(grid)), n_keep=int(attrs["mask"]["n_keep"]),
        num_views=int(attrs["view_plan"]["views"]), relation_layers=asked, layer_pos=layer_pos,
        mim_array=mim_array, mim_depth=int(attrs["depth"]), mim_heads=int(attrs["num_heads"]), mim_dim=mim_dim,
        feature_dim=None if disc is None else int(disc.arrays["features"].shape_tail[-1]),
        valid_stores=tuple(u for u in (mim_url, disc_store) if u is not None),
    )


def _check(cfg: LoaderConfig) -> Sources:
    cfg.validate()
    return resolve_sources(cfg.manifest, cfg.mim_store, cfg.disc_store, cfg.masking,
                           None if cfg.relation_layers is None else tuple(cfg.relation_layers), cfg.mim_target)


@functools.lru_cache(maxsize=16)
def _valid_rows(manifest_path: str, store_urls: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """Per shard: bool [count] rows that every store marks valid.

    `valid` is one bool per sample, so the whole array is read in one call (zarr fetches its shard
    files concurrently) rather than one request per shard; cached per process for later epochs.
    """
    from pipeline.data.manifest import read_manifest

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
    windows: tuple[tuple[int, ...], ...]  # shard ids of each mixing window, in stream order
    offsets: tuple[int, ...]  # stream position where each window starts (len(windows) + 1 entries)
    rows: np.ndarray  # int64 [n] global indices in stream order (valid rows only)

    @property
    def shards(self) -> tuple[int, ...]:
        return tuple(k for window in self.windows for k in window)


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
    from pipeline.data.manifest import read_manifest

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
        shards = mine[w::nw]
        windows = tuple(tuple(shards[i:i + cfg.mix_shards]) for i in range(0, len(shards), cfg.mix_shards))
        rows, offsets = [], [0]
        for window in windows:
            # The valid rows of every shard in the window, shuffled together: a class-sorted shard
            # then meets the other shards' classes inside one batch.
            rows_in = np.concatenate([manifest.shards[k].first_index + np.flatnonzero(valid[k]) for k in window])
            perm = np.random.default_rng([cfg.seed, epoch, *window]).permutation(rows_in.size)
            rows.append(rows_in[perm])
            offsets.append(offsets[-1] + rows_in.size)
        flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        workers.append(_WorkerStream(windows=windows, offsets=tuple(offsets), rows=flat))
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
    """One shard's targets from every store: each row's view of this epoch, decoded per sample.

    Only the chosen view of every row is kept, still encoded (fp16 / int8 / q1pct parts), so a
    worker holding `mix_shards` shards holds S x (one view's stored bytes) per shard, whatever V is.
    """

    def __init__(self, cfg: LoaderConfig, src: Sources, k: int, first: int, count: int, epoch: int):
        self.cfg, self.src, self.first = cfg, src, first
        self.view_of_row = np.array([choose_view(cfg.seed, epoch, first + r, src.num_views) for r in range(count)],
                                    dtype=np.int64)
        # Only the arrays this masking reads: each costs one Zarr read per shard.
        view_names = ["views"] + {"progressive": ["keep_progressive"], "direct": ["keep_direct"]}.get(cfg.masking, [])
        self.parts = {name: (src.view_store, parts) for name, parts in
                      _store(src.view_store).read_shard_views(k, view_names, self.view_of_row).items()}
        if src.mim_array is not None:
            got = _store(cfg.mim_store).read_shard_views(k, [src.mim_array], self.view_of_row)
            self.parts["mim"] = (cfg.mim_store, got[src.mim_array])
        if cfg.disc_store is not None:
            got = _store(cfg.disc_store).read_shard_views(k, ["features"], self.view_of_row)
            self.parts["features"] = (cfg.disc_store, got["features"])
        for name, (_, parts) in self.parts.items():
            rows = next(iter(parts.values())).shape[0]
            if rows != count:
                raise StoreError(f"store shard {k} array {name} has {rows} rows, manifest says {count}")

    def _row(self, key: str, local: int) -> np.ndarray:
        """Row `local` of one array (its epoch view), decoded."""
        url, parts = self.parts[key]
        name = {"mim": self.src.mim_array}.get(key, key)
        return _store(url).decode_rows(name, {p: a[local] for p, a in parts.items()})

    def keep(self, local: int, index: int, view: int) -> np.ndarray:
        """int64 [n_keep] (or [P] for masking none) sorted kept patch indices."""
        masking = self.cfg.masking
        if masking in ("progressive", "direct"):
            return np.asarray(self._row(f"keep_{masking}", local), dtype=np.int64)
        if masking == "random":
            from pipeline.targets.masking import random_keep

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
        if self.src.mim_array is not None:
            arr = self._row("mim", local)[list(self.src.layer_pos)]  # [L, H, Ts, Ts] or [L, Ts, D]
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
        if "features" in self.parts:
            arr = self._row("features", local)  # [Ts, D]
            if tok is not None:
                arr = arr[tok]
            out["features"] = np.asarray(arr, dtype=np.float32)
        return out

    def view_box(self, local: int):
        from pipeline.data.views import View

        return View.from_row(self._row("views", local))


def _store(url: str):
    """The store at `url`, opened once per process: a forked DataLoader worker opens its own
    rather than reuse the parent's handles (fsspec/zarr I/O state is not fork-safe for remote URLs)."""
    return _store_in(url, os.getpid())


@functools.lru_cache(maxsize=16)
def _store_in(url: str, pid: int):
    return _open_store(url)


def _decode_image(data: bytes, index: int, url: str):
    """Upright PIL RGB image from the tar's stored bytes (the decoder every stage shares)."""
    from pipeline.data.images import decode_image

    try:
        return decode_image(data, f"image {index:09d} in {url}")
    except ShardError as e:
        # The stores marked this row valid, so their teachers read it: the tar changed since.
        raise ShardError(f"{e} although the target stores hold it as valid; the tar no longer matches the one "
                         "extracted (re-run `hdpipe shard` and `hdpipe extract`)") from None


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

    def __init__(self, cfg: LoaderConfig, src: Sources, plan: EpochPlan):
        super().__init__()
        self.cfg, self.src, self.plan = cfg, src, plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()  # None in the main process (num_workers 0): stream 0
        yield from self._pieces(0 if info is None else info.id)

    def _pieces(self, w: int) -> Iterator[dict[str, Any]]:
        from pipeline.data.reading import read_shard_records, verified_stamps
        from pipeline.data.manifest import read_manifest
        from pipeline.data.views import render

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
        reported: set = set()
        for wi, window in enumerate(stream.windows):
            lo, hi = stream.offsets[wi], stream.offsets[wi + 1]
            # Positions of this window's stream range that some piece needs.
            need = [(max(s, lo), min(e, hi)) for s, e in wanted[piece:] if s < hi and e > lo]
            if not need:
                continue
            rows = stream.rows[lo:hi]
            needed_idx = set(int(i) for a, b in need for i in stream.rows[a:b])
            # Every shard of the window is read whole (its tar's sha256 checked) before any of its
            # rows is used; images are decoded only for the rows a piece needs (rows extraction
            # marked invalid may not decode at all).
            images: dict[int, bytes] = {}
            targets: dict[int, _ShardTargets] = {}
            for k in window:
                info = manifest.shards[k]
                if not any(info.first_index <= i < info.first_index + info.count for i in needed_idx):
                    continue
                for rec in read_shard_records(manifest, k):
                    if rec["index"] in needed_idx:
                        images[rec["index"]] = rec["image"]
                targets[k] = _ShardTargets(cfg, src, k, info.first_index, info.count, self.plan.epoch)
            for pos in range(lo, hi):
                while piece < len(wanted) and wanted[piece][1] <= pos:
                    piece += 1
                if piece == len(wanted):
                    break
                s, e = wanted[piece]
                if pos < s:
                    continue
                index = int(rows[pos - lo])
                k = manifest.shard_of(index)
                shard = targets[k]
                local = index - shard.first
                view = int(shard.view_of_row[local])
                image = _decode_image(images.pop(index), index, manifest.shard_url(k))
                img = render(image, shard.view_box(local), cfg.img_size, cfg.interpolation)
                rec = shard.sample(local, view=view, index=index)
                rec["image"] = (img.float() - mean) / std
                rec["index"] = np.int64(index)
                rec["view"] = np.int64(view)
                samples.append(rec)
                if pos + 1 == e:
                    out = _stack(samples)
                    out["_piece"] = torch.tensor([w, s, e], dtype=torch.int64)
                    # Tell the main process which tars this worker verified: the next epoch's
                    # workers (forked from it) then trust them while their stamps are unchanged.
                    fresh = {key: stamp for key, stamp in verified_stamps().items() if key not in reported}
                    reported |= set(fresh)
                    out["_verified"] = json.dumps([[u, h, list(st)] for (u, h), st in fresh.items()])
                    yield out
                    samples = []
            del images, targets


# ---------------------------------------------------------------------------------------------
# Main-process side: the DataLoader and the reassembly of batches in plan order.


class EpochLoader:
    """Iterable over one rank's batches of one epoch; `len()` is the number it will yield."""

    def __init__(self, cfg: LoaderConfig, plan: EpochPlan, src: Sources):
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
        from pipeline.data.reading import remember_verified

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
                remember_verified({(u, h): tuple(st) for u, h, st in json.loads(item.pop("_verified"))})
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

