"""The open_clip backend: `open_clip:NAME[:TAG]` (an image tower, `model.visual`) as a `TeacherBackend`.

An open_clip `VisionTransformer` of standard `ResidualAttentionBlock`s (nn.MultiheadAttention with a
packed `in_proj`), without attention pooling. Q and K: the q, k rows of `in_proj` applied to the
hooked `ln_1` output; final tokens: `ln_post` over every token, before `proj`. Model kwargs that are
dicts (vision_cfg={'image_size': 64}) are merged into the named config's; whole-CLIP checkpoints keep
their `visual.` keys only.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, HdpipeError
from pipeline.targets.backends.protocol import (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, Preprocessing, QKSink,
                                                TeacherSpec, ViTGeometry)
from pipeline.targets.weights import create_with_kwargs, load_into, offline_hint


def merged_kwargs(name: str, model_kwargs: dict) -> dict:
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


def create_clip(name: str, model_kwargs: dict, pretrained: str | None) -> nn.Module:
    """open_clip.create_model(name, pretrained=path or None, **merged kwargs) -> its image tower."""
    import open_clip

    model = create_with_kwargs(lambda **kw: open_clip.create_model(name, pretrained=pretrained, **kw), name,
                               merged_kwargs(name, model_kwargs), model_kwargs)
    return model.visual


class OpenClipBackend:
    """open_clip VisionTransformer: nn.MultiheadAttention; q, k = in_proj[:2D] applied to ln_1's output."""

    forms = "open_clip:NAME[:TAG]"

    def parse(self, spec: str, rest: str) -> TeacherSpec:
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

    def pretrained(self, spec: TeacherSpec, model_kwargs: dict) -> tuple[nn.Module, str]:
        import open_clip

        name, tag = spec.model, spec.tag
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
            raise offline_hint(f"open_clip '{name}:{tag}'", err) from err
        if not path:
            raise HdpipeError(f"open_clip has no download for '{name}:{tag}'; pass --checkpoint PATH")
        return create_clip(name, model_kwargs, path), f"pretrained:open_clip/{name}:{tag}"

    def create(self, spec: TeacherSpec, model_kwargs: dict) -> nn.Module:
        return create_clip(spec.model, model_kwargs, None)

    def load_state(self, model: nn.Module, state: dict, source: str) -> None:
        if any(k.startswith("visual.") for k in state):
            # A whole CLIP checkpoint: keep the image tower, drop text tower and logit scale.
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        load_into(model, state, source)

    def preprocessing(self, spec: TeacherSpec) -> Preprocessing:
        return Preprocessing(spec.mean, spec.std, spec.interpolation)

    def geometry(self, model: nn.Module, name: str) -> ViTGeometry:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise ConfigError(f"teacher '{name}': image tower is a {type(model).__name__}, not an open_clip "
                              f"VisionTransformer; for a timm-trunk tower use its timm:NAME directly")
        if model.attn_pool is not None:
            raise ConfigError(f"teacher '{name}' pools with attention; its ln_post does not act on tokens")
        for i, blk in enumerate(model.transformer.resblocks):
            if not isinstance(blk, ResidualAttentionBlock) or blk.attn.in_proj_weight is None:
                raise ConfigError(f"teacher '{name}': block {i + 1} is not a standard ResidualAttentionBlock "
                                  f"with a packed in_proj; relations cannot be read from it")
        mha = model.transformer.resblocks[0].attn
        return ViTGeometry(blocks=tuple(model.transformer.resblocks), num_heads=mha.num_heads,
                           head_dim=mha.head_dim, embed_dim=mha.embed_dim, grid=tuple(model.grid_size),
                           img_size=tuple(model.image_size), seq_first=not model.transformer.batch_first)

    def hook_qk(self, model: nn.Module, layer: int, sink: QKSink):
        blk = model.transformer.resblocks[layer - 1]
        mha = blk.attn
        dim = mha.embed_dim
        seq_first = not model.transformer.batch_first

        def hook(_module, _inputs, out):  # ln_1 output [B, N, D] ([N, B, D] when not batch_first)
            y = out.transpose(0, 1) if seq_first else out
            bias = mha.in_proj_bias[: 2 * dim] if mha.in_proj_bias is not None else None
            qk = F.linear(y, mha.in_proj_weight[: 2 * dim], bias)  # [B, N, 2D]: only q and k, v is skipped
            b, n, _ = qk.shape
            q, k = qk.reshape(b, n, 2, mha.num_heads, mha.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            sink(layer, q, k)

        return blk.ln_1.register_forward_hook(hook)

    def final_tokens(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        v = model
        x = v.conv1(x)  # [B, D, gh, gw]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, P, D]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # [B, N, D]
        x = v.ln_pre(v.patch_dropout(x))
        x = v.transformer(x)
        return v.ln_post(x)  # every token, before proj
