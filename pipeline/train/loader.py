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
default: batches then carry `_enc.*` codes and `_targets`, and `device_copy` decodes them).

Memory: a worker holds one window at a time: `mix_shards` shards' encoded images (none with stored
pixels) and, per row, the chosen view's targets still encoded (S x one view's stored bytes per
shard, whatever V is), plus `prefetch_factor` pieces.

Targets: a store built with `tokens: kept` holds [CLS] + keep_progressive rows already (only
masking `progressive` can be served); a store built with `tokens: all` serves every masking: the
kept tokens' rows and columns ([0] + 1 + keep_index) are gathered when the piece is decoded.
Gathered `attention` rows are renormalized over the kept tokens (softmax restricted to a subset), so a
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

from pipeline.errors import ConfigError, ShardError
from pipeline.targets.layout import MIM_TARGETS, MimTarget
from pipeline.targets.masking import MASKINGS, Masking
from pipeline.targets.specs import IMAGENET_MEAN, IMAGENET_STD
from pipeline.train.plan import EpochPlan, choose_view, plan_epoch, sources_of, steps_per_epoch
from pipeline.train.shard_rows import ShardRows, encoded_arrays, stored_pixels
from pipeline.train.sources import Sources
from pipeline.train.target_rows import TARGETS, TOKENS, EncodedArray, finish_targets, pack

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
        if self.mim_store is None and self.disc_store is None and self.online_plan is None:
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


def _stack(samples: list[dict[str, Any]], arrays: tuple[EncodedArray, ...]) -> dict[str, torch.Tensor]:
    """One piece's samples as batch tensors; targets stay encoded (`target_rows.pack`)."""
    out: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if key == TOKENS and vals[0] is None:
            continue  # every token stored is shown
        if any(a.key == key for a in arrays):
            out.update(pack(key, vals))
        elif isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        else:
            out[key] = torch.from_numpy(np.stack(vals))
    return out


class _PlanDataset(IterableDataset):
    """Each DataLoader worker streams its own shards and emits the plan's pieces in order."""

    def __init__(self, cfg: LoaderConfig, src: Sources | None, plan: EpochPlan, arrays: tuple[EncodedArray, ...],
                 pixels: bool):
        super().__init__()
        self.cfg, self.src, self.plan, self.arrays, self.pixels = cfg, src, plan, arrays, pixels

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
            targets: dict[int, ShardRows] = {}
            for k in window:
                info = manifest.shards[k]
                if not any(info.first_index <= i < info.first_index + info.count for i in needed_idx):
                    continue
                if not self.pixels:  # stored pixels need no tar: the stores were extracted from verified ones
                    for rec in read_shard_records(manifest, k):
                        if rec["index"] in needed_idx:
                            images[rec["index"]] = rec["image"]
                if cfg.online_plan is None:
                    targets[k] = ShardRows(cfg, src, self.arrays, k, info.first_index, info.count,
                                           self.plan.epoch, self.pixels)
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
                image = None if self.pixels else _decode_image(images.pop(index), index, manifest.shard_url(k),
                                                               manifest.max_image_pixels)
                if online is not None:  # a fresh view of the plan: its targets come from the teachers
                    view = self.plan.epoch
                    box = online.view(index, view, *image.size)
                    rec = {f"x01_{size}_{interp}": render(image, box, size, interp)
                           for size, interp in cfg.teacher_inputs}
                else:
                    shard = targets[k]
                    local = index - shard.first
                    view = int(shard.view_of_row[local])
                    rec = shard.sample(local, view=view, index=index)
                    if self.pixels:
                        rec["image"] = shard.pixels(local, index, view)
                    else:
                        box = shard.view_box(local)
                if image is not None:
                    rec["image"] = render_uint8(image, box, cfg.img_size, cfg.interpolation)
                rec["index"] = np.int64(index)
                rec["view"] = np.int64(view)
                samples.append(rec)
                if pos + 1 == e:
                    out = _stack(samples, self.arrays)
                    if cfg.target_transport == "decoded":  # the whole piece at once, in this worker
                        out = finish_targets(out, self.arrays)
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

    def __init__(self, cfg: LoaderConfig, plan: EpochPlan, src: Sources | None):
        self.cfg, self.plan, self.src = cfg, plan, src
        arrays = () if src is None else encoded_arrays(cfg.mim_store, cfg.disc_store, src)
        pixels = src is not None and stored_pixels(cfg, src)
        # What the consumer must still do to the batches: decode targets on its device (`finish_targets`)
        self.target_arrays = arrays if cfg.target_transport == "encoded" else ()
        cuda = torch.cuda.is_available()
        self.pin = cfg.pin_memory and cuda
        kwargs: dict[str, Any] = {}
        if cfg.num_workers > 0:
            kwargs["prefetch_factor"] = cfg.prefetch_factor
        self._loader = DataLoader(
            _PlanDataset(cfg, src, plan, arrays, pixels),
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
                batch = parts[0]
            else:
                batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                if self.pin:
                    batch = {key: v.pin_memory() for key, v in batch.items()}
            if self.target_arrays:  # encoded targets say how to decode them (`device_copy` does, on the device)
                batch[TARGETS] = self.target_arrays
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

