"""Building a teacher's model and loading its weights: hub tag, local checkpoint or seeded random.

What is the same for every backend lives here (`build_weights`: which of the three, the seed, the
source string; checkpoint files; the digest; kwarg errors); what a library does differently is its
backend's (`pipeline/targets/backends/`).

Local checkpoints (`.pth/.pt/.bin/.ckpt` read weights-only, `.safetensors`) are unwrapped from
`model` / `state_dict` / `module` containers and DDP prefixes; MAE's full pre-training checkpoints
lose their decoder keys; any other missing or unexpected key is an error that names it. The
weights digest (sha256 over every tensor) is what a store records and every reader checks.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.errors import ConfigError, HdpipeError

if TYPE_CHECKING:
    from pipeline.targets.backends.protocol import TeacherBackend, TeacherSpec

# Seed of `random_init` weights: fixed, so that every process (dask workers, `hdpipe verify`)
# builds the same random teacher and its stores stay comparable.
RANDOM_INIT_SEED = 0

# Keys a full MAE pre-training checkpoint carries for its decoder; the encoder never uses them.
_MAE_DECODER_PREFIXES = ("decoder_", "mask_token")


# ----------------------------------------------------------------------------- checkpoint files


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a local .pth/.pt/.bin/.ckpt/.safetensors file as a flat {key: tensor} state dict.

    Unwraps `model` / `state_dict` / `module` containers and a `module.` (DDP) key prefix. Pickles
    are read with `weights_only=True` (argparse.Namespace allowed: MAE checkpoints store their
    args), so a checkpoint cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise HdpipeError(f"checkpoint '{path}' does not exist; pass --checkpoint PATH to a local weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise HdpipeError(f"checkpoint '{path}' is not a readable safetensors file ({type(err).__name__}: "
                              f"{err}); pass --checkpoint PATH to a weights file") from None
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
            # A text or HTML file (a failed download) fails inside the unpickler with a KeyError
            # of its first byte; anything here means "not a torch weights file".
            raise HdpipeError(f"checkpoint '{path}' cannot be read as a weights-only torch file "
                              f"({type(err).__name__}: {str(err)[:200]}); "
                              f"pass --checkpoint PATH to a weights file") from None
    else:
        raise HdpipeError(f"checkpoint '{path}': unsupported suffix '{path.suffix}' (use .pth, .pt, .bin, .ckpt "
                          f"or .safetensors)")
    for _ in range(3):  # {"model": {...}} or {"state_dict": {"module": {...}}}
        if isinstance(state, dict) and not _is_flat(state):
            inner = next((state[k] for k in ("model", "state_dict", "module") if isinstance(state.get(k), dict)), None)
            if inner is None:
                raise HdpipeError(f"checkpoint '{path}' holds no state dict: top-level keys {sorted(state)[:10]} "
                                  f"(expected tensors, or one of 'model', 'state_dict', 'module')")
            state = inner
    if not isinstance(state, dict) or not _is_flat(state):
        raise HdpipeError(f"checkpoint '{path}' holds no flat {{name: tensor}} state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _is_flat(state: dict) -> bool:
    return all(isinstance(v, torch.Tensor) for v in state.values())


def strip_mae_decoder(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop the decoder/mask-token keys of a full MAE pre-training checkpoint; returns (state, dropped)."""
    dropped = [k for k in state if k.startswith(_MAE_DECODER_PREFIXES)]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a message that names every missing and unexpected key."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        def show(keys):
            return f"{list(keys[:12])}" + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "")

        raise HdpipeError(
            f"checkpoint '{source}' does not fit the model: missing keys {show(missing)}, "
            f"unexpected keys {show(unexpected)}; pass the matching --teacher/--model or another --checkpoint"
        )


def weights_digest(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state_dict tensor, in key order."""
    h = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def offline_hint(what: str, err: Exception) -> HdpipeError:
    """A backend's error for pretrained weights it could not fetch: what an offline machine passes instead."""
    return HdpipeError(
        f"could not fetch pretrained weights for {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
        f"on an offline machine pass --checkpoint PATH (a local .pth/.bin/.safetensors file) or, for a demo, "
        f"--random-init"
    )


# ----------------------------------------------------------------------------- building a model


_UNEXPECTED_KWARG = re.compile(r"unexpected keyword argument '([^']+)'")

# Where a user's model kwargs come from, as the errors below name it.
KWARGS_OPTION = "--model-kwargs (model_kwargs in a params file)"


def create_with_kwargs(create, model: str, kwargs: dict, given: dict | None = None, where: str = KWARGS_OPTION):
    """`create(**kwargs)`: a model constructor run with the user's kwargs, whose rejection is a ConfigError.

    A constructor that refuses a kwarg fails deep inside timm or open_clip with whatever it meets
    first (a TypeError for an unknown name, a ValueError or ZeroDivisionError for a bad value), so any
    exception here is the kwargs' fault: the error names the model, the kwarg where the exception
    names it (else every kwarg given: `given`, what the user wrote, defaults to `kwargs`) and
    `where` they come from; the original stays as the cause. With no kwargs nothing is caught, and
    HdpipeError (already one line) and OSError (the hub unreachable: the callers' offline hint) pass.
    """
    if not kwargs:
        return create()
    try:
        return create(**kwargs)
    except (HdpipeError, OSError):
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        unexpected = _UNEXPECTED_KWARG.search(str(err)) if isinstance(err, TypeError) else None
        if unexpected:
            raise ConfigError(f"model '{model}' has no argument '{unexpected.group(1)}' ({reason}); remove or rename "
                              f"it in {where}") from err
        raise ConfigError(f"model '{model}' cannot be built with model kwargs {given if given is not None else kwargs} "
                          f"({reason}); fix them in {where}") from err


def build_weights(backend: TeacherBackend, spec: TeacherSpec, checkpoint, random_init: bool,
                  model_kwargs: dict) -> tuple[nn.Module, str]:
    """(model, weights source) the way every backend gets them: the weights the spec names
    ("pretrained:..."), a seeded random init ("random_init:seedN") or a local checkpoint loaded into that
    random init ("checkpoint:FILE", MAE decoder keys dropped, the rest strict)."""
    if checkpoint is None and not random_init:
        return backend.pretrained(spec, model_kwargs)
    model = seeded(lambda: backend.create(spec, model_kwargs))
    if checkpoint is None:
        return model, f"random_init:seed{RANDOM_INIT_SEED}"
    load_checkpoint(backend, model, checkpoint)
    return model, f"checkpoint:{Path(checkpoint).name}"


def seeded(create):
    """create() under torch.manual_seed(RANDOM_INIT_SEED), the caller's RNG state left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return create()


def load_checkpoint(backend: TeacherBackend, model: nn.Module, checkpoint) -> None:
    """Read a local weights file (`read_checkpoint`), drop MAE decoder keys, `backend.load_state` the rest."""
    state, _ = strip_mae_decoder(read_checkpoint(checkpoint))
    backend.load_state(model, state, str(checkpoint))
