"""Building a teacher's model and loading its weights: hub tag, local checkpoint or seeded random.

Local checkpoints (`.pth/.pt/.bin/.ckpt` read weights-only, `.safetensors`) are unwrapped from
`model` / `state_dict` / `module` containers and DDP prefixes; MAE's full pre-training checkpoints
lose their decoder keys; any other missing or unexpected key is an error that names it. The
weights digest (sha256 over every tensor) is what a store records and every reader checks.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import pickle
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ConfigError, HdpipeError
from pipeline.targets.specs import TeacherSpec

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
                              f"({type(err).__name__}: {str(err)[:200]}); pass --checkpoint PATH to a weights file") from None
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


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
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


def _offline_hint(what: str, err: Exception) -> HdpipeError:
    return HdpipeError(
        f"could not fetch pretrained weights for {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
        f"on an offline machine pass --checkpoint PATH (a local .pth/.bin/.safetensors file) or, for a demo, "
        f"--random-init"
    )


# ----------------------------------------------------------------------------- model builders


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


def build_timm(name: str, checkpoint, random_init: bool, model_kwargs: dict,
               where: str = KWARGS_OPTION) -> tuple[nn.Module, str]:
    import timm

    if checkpoint is None and not random_init:
        try:
            model = create_with_kwargs(lambda **kw: timm.create_model(name, pretrained=True, **kw), name,
                                       model_kwargs, where=where)
            return model, f"pretrained:timm/{name}"
        except OSError as err:  # huggingface_hub raises OSError subclasses when the hub is unreachable
            raise _offline_hint(f"timm model '{name}'", err) from err
    with torch.random.fork_rng(devices=[]):  # fixed seed, caller's RNG state left alone
        torch.manual_seed(RANDOM_INIT_SEED)
        model = create_with_kwargs(lambda **kw: timm.create_model(name, pretrained=False, **kw), name,
                                   model_kwargs, where=where)
    if checkpoint is None:
        return model, f"random_init:seed{RANDOM_INIT_SEED}"
    state, _ = strip_mae_decoder(read_checkpoint(checkpoint))
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        # timm's own converter: open_clip/OpenAI CLIP key layouts, pos-embed resampling.
        state = checkpoint_filter_fn(state, model)
    _load_into(model, state, str(checkpoint))
    return model, f"checkpoint:{Path(checkpoint).name}"


def _open_clip_kwargs(name: str, model_kwargs: dict) -> dict:
    """Merge nested dict overrides (vision_cfg={'image_size': 64}) into the named config's dicts."""
    import open_clip

    base = open_clip.get_model_config(name)
    out = {}
    for key, value in model_kwargs.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = {**copy.deepcopy(base[key]), **value}
        else:
            out[key] = value
    return out


def build_open_clip(name: str, tag: str | None, checkpoint, random_init: bool,
                     model_kwargs: dict) -> tuple[nn.Module, str]:
    import open_clip

    kwargs = _open_clip_kwargs(name, model_kwargs)
    if checkpoint is None and not random_init:
        if not tag:
            raise ConfigError(
                f"open_clip model '{name}' was given without a pretrained tag; use open_clip:{name}:TAG "
                f"(tags: {open_clip.list_pretrained_tags_by_model(name)}), --checkpoint PATH or --random-init")
        pcfg = open_clip.get_pretrained_cfg(name, tag)
        if not pcfg:
            raise ConfigError(f"open_clip model '{name}' has no pretrained tag '{tag}' "
                              f"(tags: {open_clip.list_pretrained_tags_by_model(name)})")
        try:
            path = open_clip.download_pretrained(pcfg)
        except OSError as err:
            raise _offline_hint(f"open_clip '{name}:{tag}'", err) from err
        if not path:
            raise HdpipeError(f"open_clip has no download for '{name}:{tag}'; pass --checkpoint PATH")
        model = create_with_kwargs(lambda **kw: open_clip.create_model(name, pretrained=path, **kw), name, kwargs,
                                   model_kwargs)
        return model.visual, f"pretrained:open_clip/{name}:{tag}"
    with torch.random.fork_rng(devices=[]):  # fixed seed, caller's RNG state left alone
        torch.manual_seed(RANDOM_INIT_SEED)
        model = create_with_kwargs(lambda **kw: open_clip.create_model(name, pretrained=None, **kw), name, kwargs,
                                   model_kwargs)
    visual = model.visual
    if checkpoint is None:
        return visual, f"random_init:seed{RANDOM_INIT_SEED}"
    state, _ = strip_mae_decoder(read_checkpoint(checkpoint))
    if any(k.startswith("visual.") for k in state):
        # A whole CLIP checkpoint: keep the image tower, drop text tower and logit scale.
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    _load_into(visual, state, str(checkpoint))
    return visual, f"checkpoint:{Path(checkpoint).name}"


def student_spec(spec: TeacherSpec) -> tuple[TeacherSpec, str, dict, Path]:
    folder = Path(spec.model)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HdpipeError(f"student '{folder}': no config.json; run `hdpipe distill` to produce "
                          f"runs/<name>/student/ (config.json + model.safetensors)")
    config = json.loads(config_path.read_text())
    if "model" not in config:
        raise HdpipeError(f"student config '{config_path}' has no 'model' key (the timm model name)")
    spec = replace(
        spec,
        mean=tuple(config.get("mean", spec.mean)),
        std=tuple(config.get("std", spec.std)),
        interpolation=config.get("interpolation", spec.interpolation),
    )
    return spec, config["model"], dict(config.get("model_kwargs", {})), folder / "model.safetensors"
