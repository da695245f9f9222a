"""Frozen teachers (any registered backend's ViT) and the targets read out of one forward pass.

`load_teacher(spec)` parses the spec, which picks its backend once (`specs.BACKENDS`), builds the
model and loads its weights through that backend (pretrained tag, a local checkpoint, or a seeded
random init when asked), freezes it and wraps it in a `Teacher`. `Teacher.forward_targets`
runs the model once and returns, as float32 tensors on the teacher's device:

    relations  {layer: [B, H, N, N]}  raw Q·Kᵀ per head, no 1/sqrt(head_dim) (1-based block numbers)
    attention  {layer: [B, H, N, N]}  softmax(relations * head_dim**-0.5)
    hidden     {layer: [B, N, D]}     tokens entering block `layer` (0 = embedded tokens after the
                                      pos-embed and any pre-norm; `depth` = last block's output)
    block      {layer: [B, N, D]}     output of block `layer` (1-based)
    features   [B, N, D]              final tokens after the model's final norm (CLIP: ln_post)

N = 1 + patches, CLS first. Q and K come from the model's own projection output through the
backend's `hook_qk` (timm: a hook on `attn.qkv`, then q_norm/k_norm; open_clip's
nn.MultiheadAttention: the q,k rows of `in_proj` applied to the hooked `ln_1` output), so relations
are exactly what the attention softmax sees. This module uses a backend only through the
`TeacherBackend` Protocol (`pipeline/targets/backends/protocol.py`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from pipeline.device import autocast, pick_device
from pipeline.errors import ConfigError, require_finite
from pipeline.targets.backends.protocol import TeacherBackend, TeacherSpec
from pipeline.targets.specs import backend_of, parse_spec
from pipeline.targets.weights import build_weights, weights_digest


@dataclass(frozen=True)
class TeacherSource:
    """Everything that decides a teacher's weights: what a store records about them and what a
    worker (a dask process, `hdpipe verify`) rebuilds the same teacher from."""

    name: str  # spec: mae | clip | deit | dino | timm:NAME | open_clip:NAME[:TAG] | student:DIR
    checkpoint: str | None = None  # local weights file instead of the hub's pretrained tag
    random_init: bool = False  # seeded random weights (weights.RANDOM_INIT_SEED; demos and tests)
    model_kwargs: dict = field(default_factory=dict)  # model constructor arguments, e.g. {img_size: 64}
    mean: tuple[float, float, float] | None = None  # normalization mean overriding the spec's (None: the spec's)
    std: tuple[float, float, float] | None = None  # normalization std overriding the spec's
    interpolation: str | None = None  # resize filter overriding the spec's

    @classmethod
    def from_attrs(cls, attrs: dict) -> "TeacherSource":
        """The source a store's `hdpipe` attributes record."""
        over = attrs.get("preprocessing_override") or {}

        def tup(v):
            return None if v is None else tuple(float(x) for x in v)

        return cls(attrs["teacher"], attrs.get("checkpoint"), bool(attrs.get("random_init")),
                   dict(attrs.get("model_kwargs") or {}), tup(over.get("mean")), tup(over.get("std")),
                   over.get("interpolation"))

    def overrides(self) -> dict:
        """The preprocessing this source sets over the spec's (None where it keeps the spec's)."""
        return {"mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std), "interpolation": self.interpolation}

    def key(self) -> str:
        """A stable text key (a process caches one teacher per key and device)."""
        return json.dumps(asdict(self), sort_keys=True, default=str)

    def load(self, device: str | torch.device | None = "auto") -> "Teacher":
        return load_teacher(self.name, checkpoint=self.checkpoint, random_init=self.random_init,
                            model_kwargs=dict(self.model_kwargs), device=device, mean=self.mean, std=self.std,
                            interpolation=self.interpolation)


def load_teacher(
    name_or_spec: str,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    model_kwargs: dict | None = None,
    device: str | torch.device | None = "auto",
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    interpolation: str | None = None,
) -> "Teacher":
    """Build, load and freeze a teacher.

    name_or_spec: mae | clip | deit | dino | timm:NAME | open_clip:NAME[:TAG] | student:DIR, or
        PREFIX:... of any backend registered in `specs.BACKENDS`.
    checkpoint: local weights file used instead of the hub (MAE decoder keys are stripped; any
        other missing or unexpected key is an error naming it).
    random_init: seeded random weights (RANDOM_INIT_SEED), only when asked (demo, tests).
    model_kwargs: passed to the backend's constructor, timm.create_model / open_clip.create_model (nested dicts such as
        vision_cfg are merged into the named open_clip config), e.g. img_size=64, patch_size=8.
    device: "auto" (CUDA when present), "cpu", "cuda:1", or a torch.device.
    mean, std, interpolation: preprocessing overriding the spec's (a teacher trained with its own
        normalization: a grayscale domain, a medical model); None keeps the spec's.
    """
    if checkpoint is not None and random_init:
        raise ConfigError("--checkpoint and --random-init exclude each other; pass one")
    spec = parse_spec(name_or_spec)
    backend = backend_of(spec)
    model, source = build_weights(backend, spec, checkpoint, random_init, dict(model_kwargs or {}))
    spec = replace(spec, **asdict(backend.preprocessing(spec)))  # a student's config.json, the spec's otherwise
    overrides = {k: v for k, v in (("mean", mean), ("std", std), ("interpolation", interpolation)) if v is not None}
    if overrides:  # applied last: a student's own config.json preprocessing gives way to them too
        spec = replace(spec, **{k: tuple(float(x) for x in v) if k != "interpolation" else v
                                for k, v in overrides.items()})
    if isinstance(device, torch.device):
        dev = device
    else:
        dev = pick_device(device or "auto")
    return Teacher(spec, backend, model, source, dev)


# ----------------------------------------------------------------------------- the teacher


class Teacher(nn.Module):
    """A frozen ViT in eval mode; `train()` keeps it in eval (dropout and patch dropout stay off)."""

    def __init__(self, spec: TeacherSpec, backend: TeacherBackend, model: nn.Module, weights_source: str,
                 device: torch.device):
        super().__init__()
        geometry = backend.geometry(model, spec.name)  # a ConfigError when the model is not a readable ViT
        if geometry.img_size[0] != geometry.img_size[1]:
            raise ConfigError(f"teacher '{spec.name}' expects {geometry.img_size} inputs; views are square, "
                              f"pass img_size=S in the model arguments")
        self.spec = spec
        self.name = spec.name
        self.role = spec.role
        self.weights_source = weights_source  # "pretrained:...", "checkpoint:FILE" or "random_init:seedN"
        self.weights_digest = weights_digest(model)
        model.requires_grad_(False)
        self.model = model.to(device).eval()
        self.backend = backend
        self._blocks = list(geometry.blocks)  # a plain list: not registered twice as submodules
        self._seq_first = geometry.seq_first
        self.device = device
        self.depth = len(geometry.blocks)
        self.num_heads = geometry.num_heads
        self.head_dim = geometry.head_dim
        self.embed_dim = geometry.embed_dim
        self.grid = tuple(geometry.grid)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_prefix_tokens = 1
        self.img_size = int(geometry.img_size[0])
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
        qk_layers: Iterable[int] = (),
    ) -> dict:
        """One forward pass over a *normalized* batch x [B, 3, S, S] (see `normalize`).

        Returns float32 tensors on the teacher's device: `relations`, `attention`, `hidden`, `block`
        dicts (only for the layers asked) and `features` when `features` is true (module docstring).
        `qk_layers`: `qk[layer]` = (q, k), each [B, H, N, hd], the factors of that layer's relations,
        for a caller that needs Q·Kᵀ on a subset of tokens only (8x fewer products on 68 of 197).
        Runs under torch.inference_mode, with bf16 autocast on CUDA. Raises NonFiniteError naming the
        output and layer when any value is NaN or Inf.
        """
        relation_layers = self._check_layers("relation layers", relation_layers, 1)
        attention_layers = self._check_layers("attention layers", attention_layers, 1)
        qk_layers = self._check_layers("qk layers", qk_layers, 1)
        hidden_layers = self._check_layers("hidden layers", hidden_layers, 0)
        block_layers = self._check_layers("block layers", block_layers, 1)
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.img_size, self.img_size):
            raise ConfigError(f"teacher '{self.name}' takes [B, 3, {self.img_size}, {self.img_size}] inputs, "
                              f"got {tuple(x.shape)}")
        backend, model, blocks = self.backend, self.model, self._blocks
        scale = self.head_dim ** -0.5
        out: dict = {"relations": {}, "attention": {}, "hidden": {}, "block": {}, "qk": {}}

        def to_bnd(t):
            return (t.transpose(0, 1) if self._seq_first else t).float()

        def qk_sink(layer, q, k):
            if layer in qk_layers:
                out["qk"][layer] = (q.float(), k.float())
            if layer not in relation_layers and layer not in attention_layers:
                return
            r = q.float() @ k.float().transpose(-2, -1)  # [B, H, N, N], no 1/sqrt(hd)
            if layer in relation_layers:
                out["relations"][layer] = r
            if layer in attention_layers:
                out["attention"][layer] = torch.softmax(r * scale, dim=-1)

        handles = []
        try:
            for layer in sorted(set(relation_layers) | set(attention_layers) | set(qk_layers)):
                handles.append(backend.hook_qk(model, layer, qk_sink))
            for layer in hidden_layers:
                if layer < self.depth:
                    handles.append(blocks[layer].register_forward_pre_hook(
                        lambda _m, args, layer=layer: out["hidden"].__setitem__(layer, to_bnd(args[0]))))
                else:
                    handles.append(blocks[-1].register_forward_hook(
                        lambda _m, _a, y, layer=layer: out["hidden"].__setitem__(layer, to_bnd(y))))
            for layer in block_layers:
                handles.append(blocks[layer - 1].register_forward_hook(
                    lambda _m, _a, y, layer=layer: out["block"].__setitem__(layer, to_bnd(y))))
            with torch.inference_mode(), autocast(self.device):
                final = backend.final_tokens(model, x.to(self.device, dtype=torch.float32, non_blocking=True))
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
                where = kind if layer is None else f"{kind}[{layer}]"
                for t in (tensor if isinstance(tensor, tuple) else (tensor,)):
                    require_finite(t, f"teacher '{self.name}' output {where}",
                                   f"check the weights ({self.weights_source}) and the input batch")
