"""Frozen teachers (timm or open_clip ViTs) and the targets read out of one forward pass.

`load_teacher(spec)` builds the model, loads its weights (pretrained tag, a local checkpoint, or a
seeded random init when asked), freezes it and wraps it in a `Teacher`. `Teacher.forward_targets`
runs the model once and returns, as float32 tensors on the teacher's device:

    relations  {layer: [B, H, N, N]}  raw Q·Kᵀ per head, no 1/sqrt(head_dim) (1-based block numbers)
    attention  {layer: [B, H, N, N]}  softmax(relations * head_dim**-0.5)
    hidden     {layer: [B, N, D]}     tokens entering block `layer` (0 = embedded tokens after the
                                      pos-embed and any pre-norm; `depth` = last block's output)
    block      {layer: [B, N, D]}     output of block `layer` (1-based)
    features   [B, N, D]              final tokens after the model's final norm (CLIP: ln_post)

N = 1 + patches, CLS first. Q and K come from the model's own projection output (timm: a hook on
`attn.qkv`, then q_norm/k_norm; open_clip's nn.MultiheadAttention: the q,k rows of `in_proj`
applied to the hooked `ln_1` output), so relations are exactly what the attention softmax sees.

Specs: `mae`, `clip`, `deit`, `dino` (table below), `timm:NAME`, `open_clip:NAME[:TAG]` and
`student:DIR` (a stage-two student: DIR/config.json + DIR/model.safetensors).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.device import autocast, pick_device
from pipeline.errors import ConfigError, HdpipeError, NonFiniteError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants, CLIP's training set
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

# Seed of `random_init` weights: fixed, so that every process (dask workers, `hdpipe verify`)
# builds the same random teacher and its stores stay comparable.
RANDOM_INIT_SEED = 0

# Keys a full MAE pre-training checkpoint carries for its decoder; the encoder never uses them.
_MAE_DECODER_PREFIXES = ("decoder_", "mask_token")


@dataclass(frozen=True)
class TeacherSpec:
    """What to build and how to feed it."""

    name: str  # canonical spec string recorded in stores, e.g. "mae" or "timm:vit_small_patch16_224"
    backend: str  # "timm" | "open_clip" | "student" (a timm model built from a run's config.json)
    model: str  # timm model name (with .tag) / open_clip config name / student directory
    tag: str | None  # open_clip pretrained tag (timm keeps its tag inside `model`)
    role: str  # "mim" (relations + masks) or "disc" (features) by default for this teacher
    mean: tuple[float, float, float]  # per-channel normalization mean, inputs in [0, 1]
    std: tuple[float, float, float]  # per-channel normalization std
    interpolation: str  # resize filter of this teacher's preprocessing


TEACHERS: dict[str, TeacherSpec] = {
    "mae": TeacherSpec("mae", "timm", "vit_base_patch16_224.mae", None, "mim",
                       IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    # timm's port of OpenAI CLIP ViT-B/16 image tower; QuickGELU as in the original weights.
    "clip": TeacherSpec("clip", "timm", "vit_base_patch16_clip_quickgelu_224.openai", None, "disc",
                        OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, "bicubic"),
    "deit": TeacherSpec("deit", "timm", "deit_base_patch16_224.fb_in1k", None, "disc",
                        IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    "dino": TeacherSpec("dino", "timm", "vit_base_patch16_224.dino", None, "disc",
                        IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
}

SPEC_FORMS = "mae, clip, deit, dino, timm:NAME, open_clip:NAME[:TAG], student:DIR"


def _unknown(spec: str) -> HdpipeError:
    return ConfigError(f"unknown teacher '{spec}': choose one of {SPEC_FORMS}")


def parse_spec(spec: str) -> TeacherSpec:
    """Turn a teacher name or `backend:...` string into a TeacherSpec (preprocessing included)."""
    if spec in TEACHERS:
        return TEACHERS[spec]
    backend, _, rest = spec.partition(":")
    if not rest:
        raise _unknown(spec)
    if backend == "timm":
        import timm

        arch = rest.split(".")[0]
        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch[:12]}*")[:8]
            raise ConfigError(f"teacher '{spec}': timm has no model '{arch}' (similar: {close})")
        tag = rest.split(".", 1)[1] if "." in rest else ""
        if tag and rest not in timm.list_pretrained(f"{arch}.*"):
            raise ConfigError(f"teacher '{spec}': timm model '{arch}' has no pretrained tag '{tag}' "
                              f"(tags: {timm.list_pretrained(f'{arch}.*')})")
        cfg = timm.models.get_pretrained_cfg(rest)
        return TeacherSpec(
            name=spec, backend="timm", model=rest, tag=None,
            # MAE-pretrained encoders are the mask-image-modeling teachers; everything else is
            # discriminative by default (extract's --role overrides either way).
            role="mim" if "mae" in tag else "disc",
            mean=tuple(cfg.mean) if cfg else IMAGENET_MEAN,
            std=tuple(cfg.std) if cfg else IMAGENET_STD,
            interpolation=(cfg.interpolation if cfg and cfg.interpolation else "bicubic"),
        )
    if backend == "open_clip":
        import open_clip

        name, _, tag = rest.partition(":")
        if open_clip.get_model_config(name) is None:
            close = [m for m in open_clip.list_models() if name.split("-")[0].lower() in m.lower()][:8]
            raise ConfigError(f"teacher '{spec}': open_clip has no model config '{name}' (similar: {close})")
        pcfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
        return TeacherSpec(
            name=spec, backend="open_clip", model=name, tag=tag or None, role="disc",
            mean=tuple(pcfg.get("mean", OPENAI_DATASET_MEAN)),
            std=tuple(pcfg.get("std", OPENAI_DATASET_STD)),
            interpolation=pcfg.get("interpolation", "bicubic"),
        )
    if backend == "student":
        return TeacherSpec(name=spec, backend="student", model=rest, tag=None, role="disc",
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")
    raise _unknown(spec)


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


def _build_timm(name: str, checkpoint, random_init: bool, model_kwargs: dict) -> tuple[nn.Module, str]:
    import timm

    if checkpoint is None and not random_init:
        try:
            return timm.create_model(name, pretrained=True, **model_kwargs), f"pretrained:timm/{name}"
        except OSError as err:  # huggingface_hub raises OSError subclasses when the hub is unreachable
            raise _offline_hint(f"timm model '{name}'", err) from err
    with torch.random.fork_rng(devices=[]):  # fixed seed, caller's RNG state left alone
        torch.manual_seed(RANDOM_INIT_SEED)
        model = timm.create_model(name, pretrained=False, **model_kwargs)
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


def _build_open_clip(name: str, tag: str | None, checkpoint, random_init: bool,
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
        model = open_clip.create_model(name, pretrained=path, **kwargs)
        return model.visual, f"pretrained:open_clip/{name}:{tag}"
    with torch.random.fork_rng(devices=[]):  # fixed seed, caller's RNG state left alone
        torch.manual_seed(RANDOM_INIT_SEED)
        model = open_clip.create_model(name, pretrained=None, **kwargs)
    visual = model.visual
    if checkpoint is None:
        return visual, f"random_init:seed{RANDOM_INIT_SEED}"
    state, _ = strip_mae_decoder(read_checkpoint(checkpoint))
    if any(k.startswith("visual.") for k in state):
        # A whole CLIP checkpoint: keep the image tower, drop text tower and logit scale.
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    _load_into(visual, state, str(checkpoint))
    return visual, f"checkpoint:{Path(checkpoint).name}"


def _student_spec(spec: TeacherSpec) -> tuple[TeacherSpec, str, dict, Path]:
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


def load_teacher(
    name_or_spec: str,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    model_kwargs: dict | None = None,
    device: str | torch.device | None = "auto",
) -> "Teacher":
    """Build, load and freeze a teacher.

    name_or_spec: mae | clip | deit | dino | timm:NAME | open_clip:NAME[:TAG] | student:DIR.
    checkpoint: local weights file used instead of the hub (MAE decoder keys are stripped; any
        other missing or unexpected key is an error naming it).
    random_init: seeded random weights (RANDOM_INIT_SEED), only when asked (demo, tests).
    model_kwargs: passed to timm.create_model / open_clip.create_model (nested dicts such as
        vision_cfg are merged into the named open_clip config), e.g. img_size=64, patch_size=8.
    device: "auto" (CUDA when present), "cpu", "cuda:1", or a torch.device.
    """
    if checkpoint is not None and random_init:
        raise ConfigError("--checkpoint and --random-init exclude each other; pass one")
    spec = parse_spec(name_or_spec)
    model_kwargs = dict(model_kwargs or {})
    if spec.backend == "timm":
        model, source = _build_timm(spec.model, checkpoint, random_init, model_kwargs)
    elif spec.backend == "open_clip":
        model, source = _build_open_clip(spec.model, spec.tag, checkpoint, random_init, model_kwargs)
    else:
        spec, arch, kwargs, weights = _student_spec(spec)
        kwargs.update(model_kwargs)
        if checkpoint is None and not random_init:
            checkpoint = weights
        model, source = _build_timm(arch, checkpoint, random_init, kwargs)
    if isinstance(device, torch.device):
        dev = device
    else:
        dev = pick_device(device or "auto")
    return Teacher(spec, model, source, dev)


# ----------------------------------------------------------------------------- backends


class _TimmBackend:
    """timm VisionTransformer: blocks[i].attn.qkv -> (q, k) after q_norm / k_norm."""

    def __init__(self, model: nn.Module, name: str):
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise ConfigError(f"teacher '{name}' is a {type(model).__name__}, not a timm VisionTransformer")
        if model.cls_token is None or getattr(model, "reg_token", None) is not None or model.num_prefix_tokens != 1:
            raise ConfigError(
                f"teacher '{name}' has {model.num_prefix_tokens} prefix tokens (class token: "
                f"{model.cls_token is not None}, register tokens: {getattr(model, 'reg_token', None) is not None}); "
                f"hdpipe needs exactly one CLS token and no register tokens")
        if isinstance(model.norm, nn.Identity):
            raise ConfigError(f"teacher '{name}' applies its final norm after pooling (fc_norm); its token "
                              f"features are not normalized; use a token-pooled model")
        for i, blk in enumerate(model.blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "head_dim"):
                raise ConfigError(f"teacher '{name}': block {i + 1} has no fused qkv attention; "
                                  f"relations cannot be read from it")
        self.model = model
        self.blocks = list(model.blocks)
        attn = self.blocks[0].attn
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.embed_dim = model.embed_dim
        self.grid = tuple(model.patch_embed.grid_size)
        self.img_size = tuple(model.patch_embed.img_size)
        self.seq_first = False

    def hook_qk(self, layer: int, sink):
        attn = self.blocks[layer - 1].attn

        def hook(_module, _inputs, out):  # out [B, N, 3 * H * hd]
            b, n, _ = out.shape
            q, k, _v = out.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            sink(layer, attn.q_norm(q), attn.k_norm(k))  # [B, H, N, hd] each

        return attn.qkv.register_forward_hook(hook)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)  # [B, N, D] after the final norm


class _OpenClipBackend:
    """open_clip VisionTransformer: nn.MultiheadAttention; q, k = in_proj[:2D] applied to ln_1's output."""

    def __init__(self, visual: nn.Module, name: str):
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise ConfigError(f"teacher '{name}': image tower is a {type(visual).__name__}, not an open_clip "
                              f"VisionTransformer; for a timm-trunk tower use its timm:NAME directly")
        if visual.attn_pool is not None:
            raise ConfigError(f"teacher '{name}' pools with attention; its ln_post does not act on tokens")
        for i, blk in enumerate(visual.transformer.resblocks):
            if not isinstance(blk, ResidualAttentionBlock) or blk.attn.in_proj_weight is None:
                raise ConfigError(f"teacher '{name}': block {i + 1} is not a standard ResidualAttentionBlock "
                                  f"with a packed in_proj; relations cannot be read from it")
        self.model = visual
        self.blocks = list(visual.transformer.resblocks)
        mha = self.blocks[0].attn
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.embed_dim = mha.embed_dim
        self.grid = tuple(visual.grid_size)
        self.img_size = tuple(visual.image_size)
        self.seq_first = not visual.transformer.batch_first

    def hook_qk(self, layer: int, sink):
        blk = self.blocks[layer - 1]
        mha = blk.attn
        dim = mha.embed_dim
        seq_first = self.seq_first

        def hook(_module, _inputs, out):  # ln_1 output [B, N, D] ([N, B, D] when not batch_first)
            y = out.transpose(0, 1) if seq_first else out
            bias = mha.in_proj_bias[: 2 * dim] if mha.in_proj_bias is not None else None
            qk = F.linear(y, mha.in_proj_weight[: 2 * dim], bias)  # [B, N, 2D]: only q and k, v is skipped
            b, n, _ = qk.shape
            q, k = qk.reshape(b, n, 2, mha.num_heads, mha.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            sink(layer, q, k)

        return blk.ln_1.register_forward_hook(hook)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        v = self.model
        x = v.conv1(x)  # [B, D, gh, gw]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, P, D]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # [B, N, D]
        x = v.ln_pre(v.patch_dropout(x))
        x = v.transformer(x)
        return v.ln_post(x)  # every token, before proj


# ----------------------------------------------------------------------------- the teacher


class Teacher(nn.Module):
    """A frozen ViT in eval mode; `train()` keeps it in eval (dropout and patch dropout stay off)."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, weights_source: str, device: torch.device):
        super().__init__()
        backend = _OpenClipBackend(model, spec.name) if spec.backend == "open_clip" else _TimmBackend(model, spec.name)
        if backend.img_size[0] != backend.img_size[1]:
            raise ConfigError(f"teacher '{spec.name}' expects {backend.img_size} inputs; views are square, "
                              f"pass img_size=S in the model arguments")
        self.spec = spec
        self.name = spec.name
        self.role = spec.role
        self.weights_source = weights_source  # "pretrained:...", "checkpoint:FILE" or "random_init:seedN"
        self.weights_digest = weights_digest(model)
        model.requires_grad_(False)
        self.model = model.to(device).eval()
        self._backend = backend
        self.device = device
        self.depth = len(backend.blocks)
        self.num_heads = backend.num_heads
        self.head_dim = backend.head_dim
        self.embed_dim = backend.embed_dim
        self.grid = backend.grid
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_prefix_tokens = 1
        self.img_size = int(backend.img_size[0])
        self.mean = tuple(float(v) for v in spec.mean)
        self.std = tuple(float(v) for v in spec.std)
        self.interpolation = spec.interpolation
        self._mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @property
    def preprocessing(self) -> dict:
        """What a store records about this teacher's input pipeline."""
        return {"img_size": self.img_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] (from views.render) -> this model's normalized input, on its device."""
        x01 = x01.to(self.device, dtype=torch.float32, non_blocking=True)
        return (x01 - self._mean) / self._std

    def _check_layers(self, name: str, layers: Iterable[int], low: int) -> list[int]:
        layers = sorted({int(v) for v in layers})
        bad = [v for v in layers if not low <= v <= self.depth]
        if bad:
            raise ConfigError(f"{name} {bad} out of range {low}..{self.depth} for teacher '{self.name}' "
                              f"(depth {self.depth})")
        return layers

    def forward_targets(
        self,
        x: torch.Tensor,
        relation_layers: Iterable[int] = (),
        hidden_layers: Iterable[int] = (),
        attention_layers: Iterable[int] = (),
        block_layers: Iterable[int] = (),
        features: bool = True,
    ) -> dict:
        """One forward pass over a *normalized* batch x [B, 3, S, S] (see `normalize`).

        Returns float32 tensors on the teacher's device: `relations`, `attention`, `hidden`, `block`
        dicts (only for the layers asked) and `features` when `features` is true (module docstring).
        Runs under torch.inference_mode, with bf16 autocast on CUDA. Raises NonFiniteError naming the
        output and layer when any value is NaN or Inf.
        """
        relation_layers = self._check_layers("relation layers", relation_layers, 1)
        attention_layers = self._check_layers("attention layers", attention_layers, 1)
        hidden_layers = self._check_layers("hidden layers", hidden_layers, 0)
        block_layers = self._check_layers("block layers", block_layers, 1)
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.img_size, self.img_size):
            raise ConfigError(f"teacher '{self.name}' takes [B, 3, {self.img_size}, {self.img_size}] inputs, "
                              f"got {tuple(x.shape)}")
        backend = self._backend
        scale = self.head_dim ** -0.5
        out: dict = {"relations": {}, "attention": {}, "hidden": {}, "block": {}}

        def to_bnd(t):
            return (t.transpose(0, 1) if backend.seq_first else t).float()

        def qk_sink(layer, q, k):
            r = q.float() @ k.float().transpose(-2, -1)  # [B, H, N, N], no 1/sqrt(hd)
            if layer in relation_layers:
                out["relations"][layer] = r
            if layer in attention_layers:
                out["attention"][layer] = torch.softmax(r * scale, dim=-1)

        handles = []
        try:
            for layer in sorted(set(relation_layers) | set(attention_layers)):
                handles.append(backend.hook_qk(layer, qk_sink))
            for layer in hidden_layers:
                if layer < self.depth:
                    handles.append(backend.blocks[layer].register_forward_pre_hook(
                        lambda _m, args, layer=layer: out["hidden"].__setitem__(layer, to_bnd(args[0]))))
                else:
                    handles.append(backend.blocks[-1].register_forward_hook(
                        lambda _m, _a, y, layer=layer: out["hidden"].__setitem__(layer, to_bnd(y))))
            for layer in block_layers:
                handles.append(backend.blocks[layer - 1].register_forward_hook(
                    lambda _m, _a, y, layer=layer: out["block"].__setitem__(layer, to_bnd(y))))
            with torch.inference_mode(), autocast(self.device):
                final = backend.run(x.to(self.device, dtype=torch.float32, non_blocking=True))
                if features:
                    out["features"] = final.float()
        finally:
            for handle in handles:
                handle.remove()
        self._check_finite(out)
        return out

    def _check_finite(self, out: dict) -> None:
        for kind, value in out.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for layer, tensor in items:
                if not bool(torch.isfinite(tensor).all()):
                    where = kind if layer is None else f"{kind}[{layer}]"
                    raise NonFiniteError(
                        f"teacher '{self.name}' produced non-finite values in {where}; check the weights "
                        f"({self.weights_source}) and the input batch")
