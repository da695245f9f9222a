"""The training loop of stage two: `train_steps`, MAE-shaped.

    meters = train_steps(run, batches, max_steps=None)

`run` is a `Run` (`stages.distill.build_run` wires it): the model, `loss_fn(out, batch)` (built once,
`functools.partial(hybrid_loss, ...)`), optimizer, scheduler, device, `TrainState`, `RunLog`, `Dist`
and the step's settings. `batches` is an iterator; the loop stops after `max_steps` optimizer steps
(None: when the iterator ends), so a caller can checkpoint mid-epoch and call it again with the same
iterator. The epoch's meters live in `run.state` (restored from a checkpoint on resume), so the
returned averages cover the whole epoch however it was split or interrupted.

Meters follow the loss's keys: `loss` and one `loss_<term>` per term (`pipeline.train.losses`), in the
loss's order, which is the same on every rank (same code, same config); nothing here names a term.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from pipeline.device import autocast
from pipeline.errors import require_finite
from pipeline.train.distributed import Dist, all_mean
from pipeline.train.optim import WarmupCosine, clip_gradients
from pipeline.train.runlog import RunLog

if TYPE_CHECKING:  # types only: the loop itself needs neither the loader nor the online teachers
    from pipeline.train.loader import LoaderConfig
    from pipeline.train.online import OnlineTargets


@dataclass
class TrainState:
    """Counters a checkpoint restores: global step, loader position, and the epoch's meters so far
    (a mid-epoch resume then reports the same epoch averages as an uninterrupted run). Plain numbers
    and a {str: float} dict, so a checkpoint loads with `torch.load(weights_only=True)`."""

    step: int = 0  # optimizer steps done in the whole run
    epoch: int = 0  # current epoch (0-based)
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    epoch_sums: dict = field(default_factory=dict)  # {meter: sum over this epoch's steps}: loss, loss_<term>, ...
    epoch_steps: int = 0  # optimizer steps of `epoch` already summed
    saved_step: int | None = None  # step of the last checkpoint written (None: none yet)

    def __post_init__(self) -> None:
        if isinstance(self.epoch_sums, (list, tuple)):  # checkpoints before named terms: (loss, features, relations)
            self.epoch_sums = dict(zip(("loss", "loss_features", "loss_relations"), map(float, self.epoch_sums)))

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done, self.epoch_sums, self.epoch_steps = 0, {}, 0

    def meters(self) -> dict:
        """The epoch's averaged meters so far, and its step count."""
        n = max(self.epoch_steps, 1)
        return {k: s / n for k, s in self.epoch_sums.items()} | {"steps": self.epoch_steps}


@dataclass
class Run:
    """Everything a distillation run trains with (`stages.distill.build_run`)."""

    student: torch.nn.Module  # the bare MaskedStudent (checkpoints, export)
    model: torch.nn.Module  # what runs the forward: the student, DDP-wrapped and/or compiled
    loss_fn: Callable[[dict, dict], dict]  # hybrid_loss with this run's terms, weights and context
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    loader_cfg: LoaderConfig
    steps_per_epoch: int  # optimizer steps per epoch on every rank
    global_batch: int  # batch_size x accum_steps x world size
    lr: float  # peak lr = base_lr x global_batch / 1024
    state: TrainState  # restored on resume
    log: RunLog
    dist: Dist
    device: torch.device
    accum_steps: int = 1  # micro-batches per optimizer step; gradients synchronized on the last one
    clip_grad: float | None = None  # max global grad norm; None = no clipping
    resumed: bool = False
    online: OnlineTargets | None = None  # source: online: both teachers in the step

    def batches(self, loader) -> Iterator[dict]:
        """The loader's batches as the step reads them: on the device (on CUDA the next batch's copy
        overlaps the step, `pipeline.train.device_copy`), online with the teachers' targets."""
        from pipeline.train.device_copy import ahead_on_device

        lcfg = self.loader_cfg
        batches = ahead_on_device(iter(loader), self.device, normalize=(lcfg.mean, lcfg.std))
        return self.online.attach(batches) if self.online is not None else batches

    @property
    def checkpoint_path(self) -> Path:
        return self.log.jsonl.parent / "checkpoints" / "last.pt"


def _to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"  # pinned host batches copy asynchronously, overlapping the step
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_steps(run: Run, batches: Iterator[dict], max_steps: int | None = None) -> dict:
    """Optimizer steps over `batches` (at most `max_steps`); returns the epoch's averaged meters.

    `run.model` runs the forward (the student, possibly DDP-wrapped or compiled). An optimizer step
    takes `run.accum_steps` micro-batches; gradients are synchronized only on the last one. Losses are
    averaged over ranks before the check for NaN/Inf, so every rank stops together, before the
    optimizer applies anything.
    """
    model, state, accum, dist = run.model, run.state, run.accum_steps, run.dist
    model.train()
    names: list[str] = []  # the loss's keys: "loss", then one "loss_<term>" per term
    acc = None  # [len(names)] sums over this step's micro-batches
    micro, steps, images, t0 = 0, 0, 0, time.perf_counter()
    while max_steps is None or steps < max_steps:
        batch = next(batches, None)
        if batch is None:
            break
        batch = _to_device(batch, run.device)
        last_micro = micro == accum - 1
        sync = last_micro or not hasattr(model, "no_sync")
        with (nullcontext() if sync else model.no_sync()):
            with autocast(run.device):
                out = model(batch["image"], batch["keep_index"])
            losses = run.loss_fn(out, batch)
            (losses["loss"] / accum).backward()
        names = names or list(losses)
        terms = torch.stack([losses[k].detach().float() for k in names])
        acc = terms if acc is None else acc + terms
        images += batch["image"].shape[0]
        micro += 1
        state.batches_done += 1
        if not last_micro:
            continue
        meters = all_mean(acc / accum, dist).cpu()  # [len(names)], stacked in the same key order on every rank
        values = dict(zip(names, meters.tolist()))
        if not torch.isfinite(meters).all():
            run.optimizer.zero_grad(set_to_none=True)  # nothing of this step is applied
            saved = "none: no checkpoint was written yet" if state.saved_step is None else state.saved_step
            require_finite(meters, f"the loss at step {state.step + 1} (epoch {state.epoch}: {values})",
                           f"the run stopped; checkpoints/last.pt holds the last good state (step {saved})")
        clip_gradients(model, run.clip_grad)
        lr = run.scheduler.get_lr()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        state.step += 1
        steps += 1
        # float64 sums of the rank-averaged float32 meters (python floats: a checkpoint holds them exactly)
        state.epoch_sums = {k: state.epoch_sums.get(k, 0.0) + v for k, v in values.items()}
        state.epoch_steps += 1
        acc, micro = None, 0
        dt = time.perf_counter() - t0
        run.log.step({"step": state.step, "epoch": state.epoch, "lr": lr, **values,
                      "images_per_s": round(images * dist.world_size / max(dt, 1e-9), 2)})
        t0, images = time.perf_counter(), 0
    return state.meters()
