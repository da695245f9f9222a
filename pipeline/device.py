"""Device and precision choice, in one place so every stage picks them the same way."""
from __future__ import annotations

import contextlib
import os

import torch


def pick_device(preference: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' takes CUDA when present (the GPU of this local rank / dask worker), else the CPU."""
    if preference == "auto":
        if torch.cuda.is_available():
            rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        from pipeline.errors import ConfigError

        raise ConfigError(f"device '{preference}' was asked for but CUDA is not available; use --device auto or cpu")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (the paper's recipe); a no-op on CPU, where fp32 is both exact and fastest."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
