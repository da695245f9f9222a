"""The training loop of stage two: `train_one_epoch`, MAE-shaped.

    meters = train_one_epoch(model, loss_fn, loader, optimizer, scheduler, device, state, log,
                             accum_steps=1, clip_grad=None, max_steps=None, dist=None)

`loss_fn(out, batch)` is built once by the caller (`functools.partial(hybrid_loss, ...)`).
`loader` is an iterator of batches; the loop stops after `max_steps` optimizer steps (None: when
the iterator ends), so a caller can checkpoint mid-epoch and call it again with the same iterator.
The epoch's meters live in `state` (restored from a checkpoint on resume), so the returned
averages cover the whole epoch however it was split or interrupted.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from pipeline.device import autocast
from pipeline.errors import require_finite
from pipeline.train.distributed import Dist, all_mean
from pipeline.train.optim import WarmupCosine, clip_gradients
from pipeline.train.runlog import RunLog


@dataclass
class TrainState:
    """Counters a checkpoint restores: global step, loader position, and the epoch's meters so far
    (a mid-epoch resume then reports the same epoch averages as an uninterrupted run)."""

    step: int = 0  # optimizer steps done in the whole run
    epoch: int = 0  # current epoch (0-based)
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    epoch_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # sums of (loss, features, relations) over this epoch's steps
    epoch_steps: int = 0  # optimizer steps of `epoch` already summed
    saved_step: int | None = None  # step of the last checkpoint written (None: none yet)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done, self.epoch_sums, self.epoch_steps = 0, [0.0, 0.0, 0.0], 0

    def meters(self) -> dict:
        """The epoch's averaged meters so far."""
        n = max(self.epoch_steps, 1)
        return {"loss": self.epoch_sums[0] / n, "loss_features": self.epoch_sums[1] / n,
                "loss_relations": self.epoch_sums[2] / n, "steps": self.epoch_steps}


def _to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"  # pinned host batches copy asynchronously, overlapping the step
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_one_epoch(model: torch.nn.Module, loss_fn: Callable[[dict, dict], dict], loader: Iterator[dict],
                    optimizer: torch.optim.Optimizer, scheduler: WarmupCosine, device: torch.device,
                    state: TrainState, log: RunLog, *, accum_steps: int = 1, clip_grad: float | None = None,
                    max_steps: int | None = None, dist: Dist | None = None) -> dict:
    """Optimizer steps over `loader` (at most `max_steps`); returns the epoch's averaged meters.

    `model` runs the forward (the student, possibly DDP-wrapped or compiled). An optimizer step
    takes `accum_steps` micro-batches; gradients are synchronized only on the last one. Losses are
    averaged over ranks before the check for NaN/Inf, so every rank stops together, before the
    optimizer applies anything.
    """
    dist = dist or Dist()
    model.train()
    sums = torch.tensor(state.epoch_sums, dtype=torch.float64)
    acc = torch.zeros(3, device=device)
    micro, steps, images, t0 = 0, 0, 0, time.perf_counter()
    while max_steps is None or steps < max_steps:
        batch = next(loader, None)
        if batch is None:
            break
        batch = _to_device(batch, device)
        last_micro = micro == accum_steps - 1
        sync = last_micro or not hasattr(model, "no_sync")
        with (nullcontext() if sync else model.no_sync()):
            with autocast(device):
                out = model(batch["image"], batch["keep_index"])
            losses = loss_fn(out, batch)
            (losses["loss"] / accum_steps).backward()
        acc += torch.stack([losses["loss"].detach(), losses["loss_features"], losses["loss_relations"]]).float()
        images += batch["image"].shape[0]
        micro += 1
        state.batches_done += 1
        if not last_micro:
            continue
        meters = all_mean(acc / accum_steps, dist).cpu()  # [loss, features, relations]
        if not torch.isfinite(meters).all():
            optimizer.zero_grad(set_to_none=True)  # nothing of this step is applied
            saved = "none: no checkpoint was written yet" if state.saved_step is None else state.saved_step
            require_finite(meters, f"the loss at step {state.step + 1} (epoch {state.epoch}: loss, features, "
                                   f"relations = {meters.tolist()})",
                           f"the run stopped; checkpoints/last.pt holds the last good state (step {saved})")
        clip_gradients(model, clip_grad)
        lr = scheduler.get_lr()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        steps += 1
        sums += meters.double()
        state.epoch_sums, state.epoch_steps = sums.tolist(), state.epoch_steps + 1
        acc.zero_()
        micro = 0
        dt = time.perf_counter() - t0
        log.step({"step": state.step, "epoch": state.epoch, "lr": lr, "loss": meters[0].item(),
                  "loss_features": meters[1].item(), "loss_relations": meters[2].item(),
                  "images_per_s": round(images * dist.world_size / max(dt, 1e-9), 2)})
        t0, images = time.perf_counter(), 0
    return state.meters()
