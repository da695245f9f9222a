"""The stage-two epoch plan: which rows each rank and worker reads, and in which batches.

How an epoch is planned (a pure function of the loader config, epoch, rank, world size and the
stores' `valid` rows; see `plan_epoch`):
1. Shard order: `default_rng([seed, epoch]).permutation(n_shards)`; rank r takes the shards at
   positions r, r + W, r + 2W, ... of that order (disjoint across ranks, whole shards).
2. Within the rank, worker w (of max(1, num_workers)) takes the rank's shards w, w + nw, ...,
   grouped in that order into windows of `mix_shards` shards; its sample stream is its windows in
   order, the valid rows of each window's shards permuted together by
   `default_rng([seed, epoch, *window])`, so one batch mixes rows of `mix_shards` shards (a
   class-sorted tar does not make one-class batches).
3. Batches: each worker's stream is cut into full batches of B; the rank's batch order takes them
   round-robin over workers (w0's first, w1's first, ..., w0's second, ...); then the workers'
   leftovers (< B each), concatenated in worker order, make the last batches (assembled in the main
   process from the workers' pieces). The list is cut to `steps_per_epoch` batches.
4. View per sample and epoch (`scheduled_view`): among the first `views_used` stored views, random
   `default_rng([seed, epoch, index]).integers(views_used)` or cycle `epoch mod views_used`; online,
   a fresh view of the plan each epoch (view id = epoch).

Guarantees:
- Every rank yields exactly `steps_per_epoch(cfg, world_size)` batches (no DDP hang at epoch end).
  That count depends only on the manifest and the stores' valid rows, not on the epoch: it is
  (sum of the m smallest per-shard valid counts) // B with m = n_shards // W, a lower bound of
  every rank's sample count in every epoch, since each rank gets at least m whole shards. The
  samples beyond it are dropped for that epoch (different ones each epoch).
- Within an epoch, samples are disjoint across ranks and each sample is yielded at most once.
- Batch j depends only on (cfg, epoch, rank, world_size): `plan_epoch(..., skip_batches=k)` gives
  exactly batches k, k+1, ... of the full epoch, so a run resumes mid-epoch from the number of
  batches it consumed. `num_workers` and `mix_shards` decide the batches, so a resume keeps them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ConfigError, StoreError
from pipeline.train.sources import open_store, resolve_sources

if TYPE_CHECKING:
    from pipeline.train.loader import LoaderConfig


def sources_of(cfg: "LoaderConfig"):
    """`resolve_sources` for a loader config (validated first)."""
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
        store = open_store(url)
        if store.total != manifest.total:
            raise StoreError(f"store {url} has {store.total} samples, manifest {manifest_path} has {manifest.total}")
        ok &= np.asarray(store.read_rows(np.arange(manifest.total), names=["valid"])["valid"], dtype=bool)
    return tuple(ok[s.first_index : s.first_index + s.count] for s in manifest.shards)


@functools.lru_cache(maxsize=16)
def _valid_stores(cfg: LoaderConfig) -> tuple[str, ...]:
    """The URLs whose `valid` rows count, cached per process as `_valid_rows` is: every epoch's plan
    (in the main process and in each worker) had checked the stores again (`resolve_sources`, ~7 ms),
    a cost per epoch that bench_host's epochs of 128 images counted as 0.05 ms per image."""
    return sources_of(cfg).valid_stores


def _valid(cfg: LoaderConfig) -> tuple[np.ndarray, ...]:
    if cfg.online is not None:  # online: no store, every row (an unreadable image is an error)
        return _valid_rows(cfg.manifest, ())
    return _valid_rows(cfg.manifest, _valid_stores(cfg))


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
        raise ConfigError("loader drop_last=False gives ranks unequal step counts; "
                          "it is allowed only with world_size 1")
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


def scheduled_view(schedule: str, seed: int, epoch: int, index: int, views_used: int) -> int:
    """The stored view sample `index` shows in `epoch`, among the first `views_used`: `random`
    (uniform, `choose_view`) or `cycle` (epoch mod views_used: every view once before any repeats)."""
    if schedule == "cycle":
        return epoch % views_used
    return choose_view(seed, epoch, index, views_used)


# Showings per stored view (epochs / views used) measured as safe by the views x epochs study
# (benchmarks/quality/views_study.py: Fashion-MNIST at 28 px, 2000 images, 32 epochs, 2 seeds): every
# setting tried reached >= 99% of online's k-NN and 5-epoch fine-tune (seed means), down to one view
# shown 32 times (0.993 and 0.992 of online). 32 is the most it tried, not a limit it found: past it
# nothing was measured.
SAFE_SHOWINGS_PER_VIEW = 32.0


def view_reuse(epochs: int, views_used: int, token_resample: float = 1.0) -> tuple[str, bool]:
    """(the line `distill` prints at start-up, whether it warns): how often each stored view is shown."""
    showings = epochs / max(views_used, 1)
    resample = f", {token_resample:g} of its tokens at a time" if token_resample < 1 else ""
    line = (f"each stored view is shown ~{showings:g} times ({epochs} epochs over {views_used} stored "
            f"view(s){resample})")
    if showings <= SAFE_SHOWINGS_PER_VIEW:
        return line, False
    return (f"{line}: more than the {SAFE_SHOWINGS_PER_VIEW:g} measured as safe (cached >= 99% of online); "
            "store more views (extract --views) or see the README's views rule"), True


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
        epoch=epoch, rank=rank, world_size=world_size, workers=tuple(workers),
        batches=tuple(batches[skip_batches:steps])
    )


