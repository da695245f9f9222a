"""Stage two's data path: tar shards joined with Zarr target shards, one whole shard at a time.

`build_loader(cfg, epoch, rank, world_size, skip_batches=0)` returns an iterable of batches
(dicts of tensors); `steps_per_epoch(cfg, world_size)` is how many every rank yields.

Batch (B = `cfg.batch_size`, P = patches, n_keep kept patches, T = 1 + n_keep tokens in
[CLS] + kept order, L = number of relation layers asked for, Ht/Dt the teacher's heads/width):
    image         float32 [B, 3, img_size, img_size]  the stored view replayed, student-normalized
                  (image_transport "uint8": its uint8 pixels; `normalize_image` makes the float input
                  on the training device, `pipeline.train.device_copy.ahead_on_device` calls it)
    keep_index    int64   [B, n_keep]  sorted kept patch indices (0-based, CLS excluded)
    index         int64   [B]          global sample index (the tar `__key__`)
    view          int64   [B]          view id in [0, V) chosen for this epoch
    relations     float32 [B, L, Ht, T, T]  raw Q·Kᵀ (mim_target=relations)
    attention     float32 [B, L, Ht, T, T]  softmax(R·d^-0.5) over the T tokens (mim_target=attention)
    block_features float32 [B, L, T, Dt]    teacher block outputs (mim_target=block_features)
    features      float32 [B, T, Dt]   raw final-norm teacher tokens (disc store given)
Exactly one of relations/attention/block_features is present, when `mim_store` is given and
`relation_layers` is not empty; `masking: none` gives n_keep = P.

Which rows each rank and worker reads, in which batches, and the resume guarantee are the epoch
plan's (`pipeline.train.plan`); the store checks are `pipeline.train.sources`. Here, each worker
reads every shard of its current mixing window whole (`pipeline.train.shard_rows.ShardRows`:
`store.read_shard_views(k)` for the targets, never one random Zarr read per sample) and, unless the
store holds the student's pixels, the tar (`read_shard_records`, its sha256 checked before any row
is used), joined on the global index; the stored view is replayed with `pipeline.data.views.render`
at the student's img_size, or its stored patches are placed (`student_pixels`). The main process
reassembles worker pieces by plan position, so batch j never depends on worker timing.

Targets travel encoded until `pipeline.train.target_rows.finish_targets` decodes a whole piece:
in the worker (`target_transport` "decoded") or on the training device ("encoded", the CUDA
default: batches then carry `_enc.*` codes, stored student patches and `_targets`, a `DeviceWork`
with which `device_copy` places the patches and decodes the targets on the device).

Memory: a worker holds one window at a time: `mix_shards` shards' encoded images (none with stored
pixels) and, per row, the chosen view's targets still encoded and compressed (S x one view's stored
bytes per shard, whatever V is; decompressed into the piece's shared-memory batch when its piece is
stacked), plus its `prefetch_factor` + 4 piece buffers in shared memory, reused
(`pipeline.train.pieces.Ring`).

Targets: a store built with `tokens: kept` holds [CLS] + keep_progressive rows already (only
masking `progressive` can be served); a store built with `tokens: all` serves every masking: the
kept tokens' rows and columns ([0] + 1 + keep_index) are gathered when the piece is decoded.
Gathered `attention` rows are renormalized over the kept tokens (softmax restricted to a subset), so a
`tokens: all` store and a `tokens: kept` store give the same targets for the same mask.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import ConfigError, ShardError
from pipeline.targets.layout import MIM_TARGETS, MimTarget
from pipeline.targets.masking import MASKINGS, Masking
from pipeline.targets.specs import IMAGENET_MEAN, IMAGENET_STD
from pipeline.train.plan import EpochPlan, choose_view, plan_epoch, sources_of, steps_per_epoch
from pipeline.train.row_sources import FreshViews, OnlineViews, RowSource, StoredRows
from pipeline.train.shard_rows import encoded_arrays, stored_pixels
from pipeline.train import pieces
from pipeline.train.target_rows import (TARGETS, TOKENS, DeviceWork, EncodedArray, encoded_key, fill_rows,
                                         finish_targets, place_stored_patches, row_spec)

# The loader's public face: the plan's step count and view choice are part of its contract.
__all__ = ["LoaderConfig", "RunLoader", "EpochLoader", "build_loader", "steps_per_epoch", "choose_view", "plan_epoch"]


@dataclass(frozen=True)
class LoaderConfig:
    manifest: str  # path or URL of the dataset manifest JSON written by `hdpipe shard`
    mim_store: str | None = None  # MIM store URL (views, masks, relations); None: the disc store's, no MIM targets
    disc_store: str | None = None  # discriminative teacher's store URL (features); None = no feature targets
    batch_size: int = 64  # samples per batch on each rank (global batch = batch_size * world_size)
    num_workers: int = 4  # DataLoader worker processes per rank (0 = the main process); part of the epoch plan
    seed: int = 0  # seeds shard and sample order, view choice (with the epoch), random masks (with index, view)
    img_size: int = 224  # student input side in pixels; the stored view is rendered at this size
    mean: tuple[float, float, float] = IMAGENET_MEAN  # student's per-channel normalization mean (RGB, 0-1 scale)
    std: tuple[float, float, float] = IMAGENET_STD  # student's per-channel normalization std (RGB, 0-1 scale)
    interpolation: str = "bicubic"  # resize filter for rendering the view (bilinear|bicubic|nearest|...)
    masking: Masking = "progressive"  # which kept-token set the student sees
    relation_layers: tuple[int, ...] | None = None  # 1-based MIM blocks to load; None = all, () = none
    mim_target: MimTarget = "relations"  # which MIM store array becomes the MIM target
    pin_memory: bool = True  # pin batches in page-locked memory when CUDA is available (ignored on CPU)
    prefetch_factor: int = 2  # items each worker prepares ahead (num_workers > 0 only)
    mix_shards: int = 4  # shards whose rows each worker shuffles together (held in memory at once); part of the plan
    drop_last: bool = True  # every rank gets equal whole batches; False (world size 1 only) adds the last partial one
    view_schedule: Literal["random", "cycle"] = "random"  # random over views_used, or epoch mod views_used
    views_used: int = 0  # use only the first N stored views (0 = all)
    online: OnlineViews | None = None  # online runs: the fresh views and teacher renders; None = stored views
    image_transport: Literal["float", "uint8"] = "float"  # float: normalized here; uint8: normalized on the device
    token_resample: float = 1.0  # fraction of stored patch tokens shown per epoch ([CLS] always; 1 = all)
    # decoded: workers decode targets to float32; encoded: batches carry the stored codes and
    # `pipeline.train.target_rows.finish_targets` decodes them on the training device
    target_transport: Literal["decoded", "encoded"] = "decoded"
    # auto: the store's student pixels when it has them for this input (no JPEG decode, crop or
    # resize), else rendered from the tars; store: must use them; render: always from the tars
    student_pixels: Literal["auto", "store", "render"] = "auto"

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
        if self.mim_store is None and self.disc_store is None and self.online is None:
            raise ConfigError("loader needs at least one target store: set mim_store and/or disc_store")
        if self.image_transport not in ("float", "uint8"):
            raise ConfigError(f"loader image_transport must be 'float' or 'uint8', got {self.image_transport!r}")
        if self.views_used < 0:
            raise ConfigError(f"loader views_used must be >= 0, got {self.views_used}")
        if self.target_transport not in ("decoded", "encoded"):
            raise ConfigError(f"loader target_transport must be 'decoded' or 'encoded', got {self.target_transport!r}")
        if self.student_pixels not in ("auto", "store", "render"):
            raise ConfigError(f"loader student_pixels must be 'auto', 'store' or 'render', got {self.student_pixels!r}")
        if not 0 < self.token_resample <= 1:
            raise ConfigError(f"loader token_resample must be in (0, 1], got {self.token_resample}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"loader mean/std must be 3 values with std > 0, got {self.mean} / {self.std}")


# ---------------------------------------------------------------------------------------------
# Worker side: read whole shards, replay views, gather targets, emit plan pieces.


def _decode_image(data: bytes, index: int, url: str, max_pixels: int):
    """Upright PIL RGB image from the tar's stored bytes (the shared decoder, at the manifest's pixel limit)."""
    from pipeline.data.images import decode_image

    try:
        return decode_image(data, f"image {index:09d} in {url}", max_pixels=max_pixels)
    except ShardError as e:
        # The stores marked this row valid, so their teachers read it: the tar changed since.
        raise ShardError(f"{e} although the target stores hold it as valid; the tar no longer matches the one "
                         "extracted (re-run `hdpipe shard` and `hdpipe extract`)") from None


def normalize_image(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, 3, S, S] view pixels -> the student's float32 input: (pixels / 255 - mean) / std,
    the same operations in the same order as `render` then normalization, so the same bits on any
    device (IEEE float32 division and subtraction)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return pixels.float().div_(255).sub_(m).div_(s)


def _stack(samples: list[dict[str, Any]], arrays: tuple[EncodedArray, ...], ring: pieces.Ring | None = None
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """One piece's samples as batch tensors, targets still encoded (`_enc.<key>.<part>`), every one a
    view of one buffer (`pieces.allocate`: shared memory in a worker, one of `ring`'s when free),
    stored rows decompressed straight into it (`target_rows.fill_rows`); that buffer and its slot."""
    entries: dict[str, list] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if key == TOKENS and vals[0] is None:
            continue  # every token stored is shown
        if any(a.key == key for a in arrays):
            entries.update({encoded_key(key, p): [v[p] for v in vals] for p in vals[0]})
        else:
            entries[key] = [v.numpy() if isinstance(v, torch.Tensor) else v for v in vals]
    buf, out, slot = pieces.allocate({key: row_spec(vals) for key, vals in entries.items()}, ring)
    for key, vals in entries.items():
        fill_rows(vals, out[key].numpy())
    return out, buf, slot


class _PlanStream(IterableDataset):
    """Each DataLoader worker streams its own shards and emits the plan's pieces in order, epoch
    after epoch: one set of workers serves the whole run (`RunLoader`)."""

    def __init__(self, cfg: LoaderConfig, rows: RowSource, epochs: range, rank: int, world_size: int,
                 skip_batches: int, ring: pieces.Ring | None = None):
        super().__init__()
        self.cfg, self.rows, self.epochs = cfg, rows, epochs
        self.rank, self.world_size, self.skip_batches = rank, world_size, skip_batches
        self.ring = ring  # the workers' reusable piece buffers (None: fresh ones)

    def plan(self, epoch: int) -> EpochPlan:
        skip = self.skip_batches if epoch == self.epochs.start else 0
        return plan_epoch(self.cfg, epoch, self.rank, self.world_size, skip)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()  # None in the main process (num_workers 0): stream 0
        w = 0 if info is None else info.id
        for epoch in self.epochs:  # a pure function of the epoch: every worker computes the same plan
            yield from self._pieces(w, self.plan(epoch))

    def _pieces(self, w: int, plan: EpochPlan) -> Iterator[dict[str, Any]]:
        from pipeline.data.manifest import read_manifest
        from pipeline.data.reading import read_shard_records

        cfg, rows_of = self.cfg, self.rows
        stream = plan.workers[w]
        wanted = sorted((s, e) for ww, s, e in (p for b in plan.batches for p in b) if ww == w)
        if not wanted:
            return
        manifest = read_manifest(cfg.manifest)
        piece = 0
        samples: list[dict[str, Any]] = []
        for wi, window in enumerate(stream.windows):
            lo, hi = stream.offsets[wi], stream.offsets[wi + 1]
            # Positions of this window's stream range that some piece needs.
            need = [(max(s, lo), min(e, hi)) for s, e in wanted[piece:] if s < hi and e > lo]
            if not need:
                continue
            rows = stream.rows[lo:hi]
            needed_idx = set(int(i) for a, b in need for i in stream.rows[a:b])
            # Every shard of the window is read whole (a tar's sha256 checked) before any of its rows
            # is used; images are decoded only for the rows a piece needs (rows extraction marked
            # invalid may not decode at all).
            images: dict[int, bytes] = {}
            shards: dict[int, Any] = {}
            for k in window:
                info = manifest.shards[k]
                if not any(info.first_index <= i < info.first_index + info.count for i in needed_idx):
                    continue
                if rows_of.reads_tars:
                    for rec in read_shard_records(manifest, k):
                        if rec["index"] in needed_idx:
                            images[rec["index"]] = rec["image"]
                shards[k] = rows_of.open_shard(k, info.first_index, info.count, plan.epoch)
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
                image = (_decode_image(images.pop(index), index, manifest.shard_url(k), manifest.max_image_pixels)
                         if rows_of.reads_tars else None)
                rec = rows_of.row(shards[k], index, image, plan.epoch)
                rec["index"] = np.int64(index)
                samples.append(rec)
                if pos + 1 == e:
                    out, buf, slot = _stack(samples, rows_of.arrays if isinstance(rows_of, StoredRows) else (),
                                            self.ring)
                    # The whole piece at once, here or on the training device (`finish_batch`): uint8
                    # patches travel when the device also normalizes, encoded targets when it decodes.
                    if isinstance(rows_of, StoredRows):
                        if not (cfg.target_transport == "encoded" and cfg.image_transport == "uint8"):
                            out = place_stored_patches(out, rows_of.src.grid)
                        if cfg.target_transport == "decoded":
                            out = finish_targets(out, rows_of.arrays)
                    if cfg.image_transport == "float":  # the whole piece at once
                        out["image"] = normalize_image(out["image"], cfg.mean, cfg.std)
                    out["_piece"] = (plan.epoch, w, s, e)  # plain ints: no tensor, no file descriptor
                    yield pieces.pack(out, buf, slot)  # one file descriptor for the piece's stacked tensors
                    samples = []
            del images, shards


# ---------------------------------------------------------------------------------------------
# Main-process side: one DataLoader for the run, and the reassembly of batches in plan order.


class RunLoader:
    """One rank's batches of epochs `first_epoch` .. `end_epoch - 1` from one set of DataLoader
    workers that lives for all of them: a worker that finishes its pieces of epoch e goes on with
    its first window of e + 1 (at most `prefetch_factor` pieces ahead), so the next epoch's first
    batches are ready at the boundary, and nothing is forked, opened or verified twice (a worker
    remembers the tars it verified)."""

    def __init__(self, cfg: LoaderConfig, first_epoch: int, end_epoch: int, rank: int = 0, world_size: int = 1,
                 skip_batches: int = 0):
        cfg.validate()
        self.cfg = cfg
        self.src = None if cfg.online is not None else sources_of(cfg)
        if self.src is not None and cfg.views_used > self.src.num_views:
            raise ConfigError(f"views_used {cfg.views_used} exceeds the {self.src.num_views} views stored in "
                              f"{self.src.view_store}")
        if cfg.online is not None:
            self.rows: RowSource = FreshViews(cfg, cfg.online)
        else:
            self.rows = StoredRows(cfg, self.src, encoded_arrays(cfg.mim_store, cfg.disc_store, self.src),
                                   stored_pixels(cfg, self.src))
        # What the consumer must still do to the batches on its device (`finish_batch`): decode
        # targets, place stored patches
        self.device_work = (DeviceWork(self.rows.arrays, self.src.grid) if isinstance(self.rows, StoredRows)
                            and cfg.target_transport == "encoded" else None)
        self.stream = _PlanStream(cfg, self.rows, range(first_epoch, end_epoch), rank, world_size, skip_batches)
        self.ring: pieces.Ring | None = None  # the current workers' piece buffers (`epochs`)
        self.plans = {first_epoch: self.stream.plan(first_epoch)}  # the first is checked now (skip_batches)
        self.pin = cfg.pin_memory and torch.cuda.is_available()
        kwargs: dict[str, Any] = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers > 0 else {}
        self._loader = DataLoader(self.stream, batch_size=None, num_workers=cfg.num_workers, pin_memory=self.pin,
                                  **kwargs)  # batch_size None: workers emit whole pieces, batched by the plan

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self.plans:
            self.plans = {epoch: self.stream.plan(epoch)}  # one at a time: a plan holds every row index
        return self.plans[epoch]

    def epochs(self) -> Iterator[tuple[int, Iterator[dict[str, torch.Tensor]]]]:
        """(epoch, its batches) in order. Batches of an epoch the caller did not take are read and
        dropped before the next epoch's (workers stream the epochs in order). Starts the workers at
        the first `next`, so their first windows are read while the caller sets up."""
        first = self.stream.epochs.start
        any_batches = len(self.stream.epochs) > 1 or bool(self.plans.get(first, self.plan(first)).batches)
        # The new workers' reusable piece buffers. Pieces a worker can have out at once:
        # prefetch_factor queued, one waiting for another worker's part of its batch, the batch
        # being used, the one let go since the last `reclaim` and one to spare.
        self.ring = self.stream.ring = (pieces.Ring(self.cfg.num_workers, self.cfg.prefetch_factor + 4)
                                        if self.cfg.num_workers > 0 and pieces.Ring.supported() else None)
        it = iter(self._loader) if any_batches else iter(())
        queues: dict[int, deque] = {w: deque() for w in range(max(1, self.cfg.num_workers))}
        for epoch in self.stream.epochs:
            batches = self._batches(it, self.plan(epoch), queues)
            yield epoch, batches
            for _ in batches:  # batches the caller left (e.g. a partial accumulation): their pieces come first
                pass

    def _batches(self, it, plan: EpochPlan, queues: dict[int, deque]) -> Iterator[dict[str, torch.Tensor]]:
        for segments in plan.batches:
            parts = []
            for w, s, e in segments:
                while not queues[w]:
                    if self.ring is not None:
                        self.ring.reclaim()  # buffers of the batches let go since
                    raw = next(it)
                    by = int(raw["_piece"][1])
                    queues[by].append(pieces.unpack(raw, self.ring, by))
                    del raw  # it holds the buffer too
                item = queues[w].popleft()
                got = tuple(int(x) for x in item.pop("_piece"))
                if got != (plan.epoch, w, s, e):
                    raise AssertionError(f"loader piece {got} arrived where {(plan.epoch, w, s, e)} was planned")
                parts.append(item)
            if len(parts) == 1:
                batch = parts[0]
            else:
                batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                if self.pin:
                    batch = {key: v.pin_memory() for key, v in batch.items()}
            if self.device_work is not None:  # say what is left to do (`device_copy` does it, on the device)
                batch[TARGETS] = self.device_work
            yield batch


class EpochLoader:
    """Iterable over one rank's batches of one epoch; `len()` is the number it will yield."""

    def __init__(self, run: RunLoader, epoch: int):
        self.run, self.epoch = run, epoch
        self.cfg, self.plan, self.src = run.cfg, run.plan(epoch), run.src

    def __len__(self) -> int:
        return len(self.plan.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Starts the workers now (not at the first `next`)."""
        return next(self.run.epochs())[1]


def build_loader(
    cfg: LoaderConfig, epoch: int, rank: int = 0, world_size: int = 1, skip_batches: int = 0
) -> EpochLoader:
    """One rank's batches of `epoch`: exactly steps_per_epoch(cfg, world_size) - skip_batches of them
    (a run of several epochs uses one `RunLoader`, whose workers serve them all).

    Checks the stores first (complete, same manifest, view plan and token set, relation layers and
    MIM target stored, masking servable) and raises StoreError naming the field and the extract
    command that fixes it. Batch j is a pure function of (cfg, epoch, rank, world_size): see the
    module docstring for the plan and the resume guarantee.
    """
    return EpochLoader(RunLoader(cfg, epoch, epoch + 1, rank, world_size, skip_batches), epoch)
