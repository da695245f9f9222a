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
reads every shard of its current mixing window whole: `read_shard_records` for the images (the
tar's sha256 checked before any row is used) and `store.read_shard_views(k)` for the targets
(never one random Zarr read per sample), joined on the global index; the stored view is replayed
with `pipeline.data.views.render` at the student's img_size. The main process reassembles worker
pieces by plan position, so batch j never depends on worker timing.

Memory: a worker holds one window at a time: `mix_shards` shards' encoded images and, per row, the
chosen view's targets still encoded (S x one view's stored bytes per shard, whatever V is; rows
are decoded to float32 one sample at a time), plus `prefetch_factor` pieces.

Targets: a store built with `tokens: kept` holds [CLS] + keep_progressive rows already (only
masking `progressive` can be served); a store built with `tokens: all` serves every masking: the
kept tokens' rows and columns ([0] + 1 + keep_index) are gathered at load time. Gathered
`attention` rows are renormalized over the kept tokens (softmax restricted to a subset), so a
`tokens: all` store and a `tokens: kept` store give the same targets for the same mask.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import ConfigError, ShardError, StoreError
from pipeline.targets.layout import MIM_TARGETS, MimTarget
from pipeline.targets.masking import MASKINGS, Masking
from pipeline.targets.specs import IMAGENET_MEAN, IMAGENET_STD
from pipeline.train.plan import EpochPlan, choose_view, plan_epoch, scheduled_view, sources_of, steps_per_epoch
from pipeline.train.resample import token_positions, token_subset
from pipeline.train.sources import Sources, open_store

# The loader's public face: the plan's step count and view choice are part of its contract.
__all__ = ["LoaderConfig", "EpochLoader", "build_loader", "steps_per_epoch", "choose_view", "plan_epoch"]


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
    online_plan: tuple | None = None  # online: (seed, scale, ratio, hflip) of fresh views; None = stored
    teacher_inputs: tuple[tuple[int, str], ...] = ()  # online: (size, interpolation) of each teacher's render
    image_transport: Literal["float", "uint8"] = "float"  # float: normalized here; uint8: normalized on the device
    token_resample: float = 1.0  # fraction of stored patch tokens shown per epoch ([CLS] always; 1 = all)

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
        if self.mim_store is None and self.disc_store is None and self.online_plan is None:
            raise ConfigError("loader needs at least one target store: set mim_store and/or disc_store")
        if self.image_transport not in ("float", "uint8"):
            raise ConfigError(f"loader image_transport must be 'float' or 'uint8', got {self.image_transport!r}")
        if self.views_used < 0:
            raise ConfigError(f"loader views_used must be >= 0, got {self.views_used}")
        if not 0 < self.token_resample <= 1:
            raise ConfigError(f"loader token_resample must be in (0, 1], got {self.token_resample}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"loader mean/std must be 3 values with std > 0, got {self.mean} / {self.std}")


# ---------------------------------------------------------------------------------------------
# Worker side: read whole shards, replay views, gather targets, emit plan pieces.


class _ShardTargets:
    """One shard's targets from every store: each row's view of this epoch, decoded per sample.

    Only the chosen view of every row is kept, still encoded (fp16 / int8 / q1pct parts), so a
    worker holding `mix_shards` shards holds S x (one view's stored bytes) per shard, whatever V is.
    """

    def __init__(self, cfg: LoaderConfig, src: Sources, k: int, first: int, count: int, epoch: int):
        self.cfg, self.src, self.first, self.epoch = cfg, src, first, epoch
        used = cfg.views_used or src.num_views
        self.view_of_row = np.array([scheduled_view(cfg.view_schedule, cfg.seed, epoch, first + r, used)
                                     for r in range(count)], dtype=np.int64)
        # Only the arrays this masking reads: each costs one Zarr read per shard.
        view_names = ["views"] + {"progressive": ["keep_progressive"], "direct": ["keep_direct"]}.get(cfg.masking, [])
        self.parts = {name: (src.view_store, parts) for name, parts in
                      open_store(src.view_store).read_shard_views(k, view_names, self.view_of_row).items()}
        if src.mim_array is not None:
            got = open_store(cfg.mim_store).read_shard_views(k, [src.mim_array], self.view_of_row)
            self.parts["mim"] = (cfg.mim_store, got[src.mim_array])
        if cfg.disc_store is not None:
            got = open_store(cfg.disc_store).read_shard_views(k, ["features"], self.view_of_row)
            self.parts["features"] = (cfg.disc_store, got["features"])
        for name, (_, parts) in self.parts.items():
            rows = next(iter(parts.values())).shape[0]
            if rows != count:
                raise StoreError(f"store shard {k} array {name} has {rows} rows, manifest says {count}")

    def _row(self, key: str, local: int) -> np.ndarray:
        """Row `local` of one array (its epoch view), decoded."""
        url, parts = self.parts[key]
        name = {"mim": self.src.mim_array}.get(key, key)
        return open_store(url).decode_rows(name, {p: a[local] for p, a in parts.items()})

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
        # Token positions inside the stored token axis: a kept-token store is [CLS]+kept already.
        tok = None if self.src.tokens == "kept" else token_positions(keep)
        if self.cfg.token_resample < 1:  # this epoch's subset of the kept tokens (pipeline.train.resample)
            sub = token_subset(self.cfg.seed, self.epoch, index, len(keep), self.cfg.token_resample)
            keep, tok = keep[sub], token_positions(sub) if tok is None else tok[token_positions(sub)]
        out = {"keep_index": keep}
        if self.src.mim_array is not None:
            arr = self._row("mim", local)[list(self.src.layer_pos)]  # [L, H, Ts, Ts] or [L, Ts, D]
            if tok is not None:
                if self.src.mim_array == "block_features":
                    arr = arr[:, tok]
                else:
                    arr = arr[:, :, tok[:, None], tok[None, :]]
                if self.src.mim_array == "attention":
                    # A store holds softmax over its tokens; renormalizing the columns shown gives
                    # exactly the softmax over [CLS] + those tokens (what a student seeing only
                    # them can match).
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
        from pipeline.data.views import ViewPlan, render, render_uint8

        cfg, src = self.cfg, self.src
        stream = self.plan.workers[w]
        wanted = sorted((s, e) for ww, s, e in (p for b in self.plan.batches for p in b) if ww == w)
        if not wanted:
            return
        manifest = read_manifest(cfg.manifest)
        online = None
        if cfg.online_plan is not None:  # view ids up to this epoch exist in the plan
            seed, scale, ratio, hflip = cfg.online_plan
            online = ViewPlan(seed=seed, views=self.plan.epoch + 1, size=cfg.img_size, scale=scale, ratio=ratio,
                              hflip=hflip, interpolation=cfg.interpolation)
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
                if cfg.online_plan is None:
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
                image = _decode_image(images.pop(index), index, manifest.shard_url(k), manifest.max_image_pixels)
                if online is not None:  # a fresh view of the plan: its targets come from the teachers
                    view = self.plan.epoch
                    box = online.view(index, view, *image.size)
                    rec = {f"x01_{size}_{interp}": render(image, box, size, interp)
                           for size, interp in cfg.teacher_inputs}
                else:
                    shard = targets[k]
                    local = index - shard.first
                    view = int(shard.view_of_row[local])
                    box = shard.view_box(local)
                    rec = shard.sample(local, view=view, index=index)
                rec["image"] = render_uint8(image, box, cfg.img_size, cfg.interpolation)
                rec["index"] = np.int64(index)
                rec["view"] = np.int64(view)
                samples.append(rec)
                if pos + 1 == e:
                    out = _stack(samples)
                    if cfg.image_transport == "float":  # the whole piece at once
                        out["image"] = normalize_image(out["image"], cfg.mean, cfg.std)
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
        """Starts the workers now (not at the first `next`), so an epoch can be started ahead of
        time (`pipeline.train.epochs`): its workers read their first windows while the step runs."""
        if not self.plan.batches:
            return iter(())
        return self._batches(iter(self._loader))

    def _batches(self, it) -> Iterator[dict[str, torch.Tensor]]:
        from pipeline.data.reading import remember_verified

        queues: dict[int, deque] = {w: deque() for w in range(len(self.plan.workers))}
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
    cfg.validate()
    src = None if cfg.online_plan is not None else sources_of(cfg)
    if src is not None and cfg.views_used > src.num_views:
        raise ConfigError(f"views_used {cfg.views_used} exceeds the {src.num_views} views stored in {src.view_store}")
    plan = plan_epoch(cfg, epoch, rank, world_size, skip_batches)
    return EpochLoader(cfg, plan, src)

