"""Atomic training checkpoints and the student export.

A checkpoint is one `torch.save` blob written with `pipeline.urls.atomic_write_bytes`, so a run
killed at any instant leaves either the previous checkpoint or the new one, never half of one.
Contents (see `stages.distill`): model (student + heads), optimizer, scheduler, scaler (None: bf16
autocast needs no loss scaling), loader position (epoch, batches done in that epoch), global step,
RNG states (python, numpy, torch CPU, torch CUDA), the resolved config.

Only tensors and plain containers (dict, list, tuple, str, int, float, bool, None) go in, so
`load_checkpoint` reads it with `torch.load(weights_only=True)`: a planted or foreign `last.pt`
whose pickle would run code on `--resume` is refused, never run. The RNG states, which Python and
numpy give as tuples with a numpy array, are stored as int64 tensors and numbers (`rng_state`) and
rebuilt exactly (`set_rng_state`).

The export is the timm encoder alone: `student/model.safetensors` with timm's key names and
`student/config.json` = {"model": name, "model_kwargs": {...}, "mean", "std", "interpolation"}
(ARCHITECTURE.md "Students").
"""
from __future__ import annotations

import io
import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import CheckpointError
from pipeline.urls import atomic_write_bytes, exists, read_bytes

CHECKPOINT_NAME = "last.pt"
REQUIRED = ("model", "optimizer", "scheduler", "state", "rng", "config")  # what a resume reads


def rng_state() -> dict:
    """Every RNG a training step can draw from, as tensors and plain numbers (weights_only-loadable)."""
    version, words, gauss = random.getstate()  # (3, 625 ints < 2**32, None | float)
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # ("MT19937", uint32 [624], int, int, float)
    state = {
        "python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _decoded(state: dict) -> tuple[tuple, tuple, torch.Tensor, list | None]:
    """(python state, numpy state, torch state, cuda states) as the RNG setters take them."""
    py, npy = state["python"], state["numpy"]
    python = (int(py["version"]), tuple(int(w) for w in py["words"].tolist()), py["gauss"])
    numpy = (str(npy["kind"]), npy["keys"].numpy().astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
             float(npy["cached_gaussian"]))
    if not isinstance(state["torch"], torch.Tensor):
        raise TypeError("torch RNG state is not a tensor")
    return python, numpy, state["torch"], state.get("cuda")


def set_rng_state(state: dict) -> None:
    python, numpy, cpu, cuda = _decoded(state)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(url: str, state: dict) -> None:
    """Serialize `state` (tensors and plain containers only) and write it atomically to `url`."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(str(url), buf.getvalue())


def load_checkpoint(url: str) -> dict | None:
    """The checkpoint at `url`, or None when there is none.

    Read with `weights_only=True`: a pickle that names any other global (code to run) is refused.
    Anything that is not a whole hdpipe checkpoint (foreign, truncated, corrupt, keys missing) is a
    one-line CheckpointError naming the file."""
    if not exists(str(url)):
        return None
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would break the one-line error
            warnings.simplefilter("ignore")
            ckpt = torch.load(io.BytesIO(read_bytes(str(url))), map_location="cpu", weights_only=True)
        missing = [k for k in REQUIRED if k not in ckpt] if isinstance(ckpt, dict) else list(REQUIRED)
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        for rng in ckpt["rng"]:
            _decoded(rng)  # every rank's RNG state must rebuild
    except Exception as e:  # noqa: BLE001 - whatever the bytes are, the user's fix is the same
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]  # the first sentence says it
        raise CheckpointError(
            f"{url} is not a checkpoint hdpipe can trust ({type(e).__name__}: {first}): foreign, damaged or written "
            f"before checkpoints held tensors only; nothing in it ran. Delete it and run without --resume (the run "
            f"starts over), or put back a good copy"
        ) from None
    return ckpt


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
