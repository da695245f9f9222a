"""torch.distributed for stage two: the process group under torchrun, and what ranks must share.

Under torchrun (`RANK` / `WORLD_SIZE` in the environment) the group is initialized with NCCL on
GPU and gloo on CPU. Rank 0 alone writes files, and alone holds the run folder's writer lock
(`main_rank_lock`, `locked_group`); every rank reads the checkpoint on resume, so the run directory must be on a
file system all nodes share.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from pipeline.device import pick_device
from pipeline.errors import ConfigError, LockError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this process created the group (and must destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """torchrun's environment present -> the process group (NCCL on GPU, gloo on CPU); else one process."""
    import torch.distributed as dist

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = pick_device(device_pref, local_rank=local)
        here = False
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            here = True
        return Dist(rank, world, local, here), device
    return Dist(), pick_device(device_pref)


def shutdown(d: Dist) -> None:
    if d.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()


def all_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a small float tensor over ranks (identity without DDP)."""
    if d.world_size == 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values / d.world_size


def gather_objects(obj, d: Dist) -> list:
    """Every rank's `obj`, in rank order (a list of one without DDP)."""
    if d.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def same_on_every_rank(d: Dist, step: int, run_dir) -> None:
    """Every rank must start from the same checkpoint (else their loaders and steps diverge and hang)."""
    steps = gather_objects(step, d)
    if len(set(steps)) != 1:
        raise ConfigError(
            f"ranks start from different steps {steps}: every rank reads {run_dir}/checkpoints/last.pt, so the run "
            f"directory must be on a filesystem all nodes share (or an fsspec URL) for --resume"
        )


@contextlib.contextmanager
def main_rank_lock(d: Dist, folder, what: str) -> Iterator[None]:
    """Rank 0 holds `pipeline.locks.writer_lock(folder, what)` (it alone writes files). When another
    writer holds it, every rank raises rank 0's LockError (no rank waits on a rank 0 that left)."""
    from pipeline.locks import writer_lock

    with contextlib.ExitStack() as stack:
        refused = None
        if d.main:
            try:
                stack.enter_context(writer_lock(str(folder), what))
            except LockError as e:
                refused = str(e)
        refused = gather_objects(refused, d)[0]
        if refused:
            raise LockError(refused)
        yield


@contextlib.contextmanager
def locked_group(device_pref: str, folder, what: str) -> Iterator[tuple[Dist, torch.device]]:
    """`init_distributed`, with rank 0 holding the writer lock of `folder` for the block; the group
    is shut down on the way out, errors included."""
    d, device = init_distributed(device_pref)
    try:
        with main_rank_lock(d, folder, what):
            yield d, device
    finally:
        shutdown(d)


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
