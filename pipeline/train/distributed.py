"""torch.distributed for stage two: the process group under torchrun, and what ranks must share.

Under torchrun (`RANK` / `WORLD_SIZE` in the environment) the group is initialized with NCCL on
GPU and gloo on CPU. Rank 0 alone writes files; every rank reads the checkpoint on resume, so the
run directory must be on a file system all nodes share.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pipeline.device import pick_device
from pipeline.errors import ConfigError


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


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
