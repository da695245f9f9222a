"""Atomic training checkpoints and the student export.

A checkpoint is one `torch.save` blob written with `pipeline.urls.atomic_write_bytes`, so a run
killed at any instant leaves either the previous checkpoint or the new one, never half of one.
Contents (see `stages.distill`): model (student + heads), optimizer, scheduler, scaler (None: bf16
autocast needs no loss scaling), loader position (epoch, batches done in that epoch), global step,
RNG states (python, numpy, torch CPU, torch CUDA), the resolved config.

The export is the timm encoder alone: `student/model.safetensors` with timm's key names and
`student/config.json` = {"model": name, "model_kwargs": {...}, "mean", "std", "interpolation"}
(ARCHITECTURE.md "Students").
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.urls import atomic_write_bytes, exists, read_bytes

CHECKPOINT_NAME = "last.pt"


def rng_state() -> dict:
    """Every RNG a training step can draw from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(url: str, state: dict) -> None:
    """Serialize `state` and write it atomically to `url`."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(str(url), buf.getvalue())


def load_checkpoint(url: str) -> dict | None:
    """The checkpoint at `url`, or None when there is none."""
    if not exists(str(url)):
        return None
    # weights_only=False: the blob holds RNG states (numpy/python tuples) written by this program.
    return torch.load(io.BytesIO(read_bytes(str(url))), map_location="cpu", weights_only=False)


def export_student(state_dict: dict[str, torch.Tensor], model: str, model_kwargs: dict, out_dir: str | Path,
                   preprocessing: dict | None = None) -> Path:
    """Write `out_dir/model.safetensors` (timm keys) and `out_dir/config.json`; returns out_dir.

    `preprocessing` ({"mean", "std", "interpolation"}: what the student was trained with) goes into
    config.json so `load_teacher("student:DIR")` normalizes inputs the same way."""
    from safetensors.torch import save

    out = Path(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # One metadata key: safetensors orders a header's metadata by hash, so two keys make the bytes
    # (and DVC's hash of the export) differ between identical runs. The model name is in config.json.
    atomic_write_bytes(str(out / "model.safetensors"), save(tensors, metadata={"format": "pt"}))
    cfg = {"model": model, "model_kwargs": dict(model_kwargs), **dict(preprocessing or {})}
    if cfg["model_kwargs"].get("num_classes") == 0:
        cfg["head"] = ("none: the encoder without a classifier; fine-tune with timm.create_model(model, "
                       "pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=<model.safetensors>, "
                       "num_classes=0), **model_kwargs minus num_classes)")
    atomic_write_bytes(str(out / "config.json"), (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
    return out
