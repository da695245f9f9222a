"""The timm backend: `timm:NAME[.TAG]` (and the short names mae, clip, deit, dino) as a `TeacherBackend`.

Any timm `VisionTransformer` with one CLS token, no register tokens and its final norm over every
token. Q and K: a hook on each block's fused `attn.qkv`, then `q_norm` / `k_norm`. Local checkpoints
pass through timm's own converter (open_clip / OpenAI CLIP key layouts, pos-embed resampling).
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.targets.backends.protocol import (IMAGENET_MEAN, IMAGENET_STD, Preprocessing, QKSink, TeacherSpec,
                                                ViTGeometry)
from pipeline.targets.weights import KWARGS_OPTION, create_with_kwargs, load_into, offline_hint


def create_timm(name: str, model_kwargs: dict, pretrained: bool, where: str = KWARGS_OPTION) -> nn.Module:
    """timm.create_model(name, pretrained, **model_kwargs); rejected kwargs name `where` they came from."""
    import timm

    return create_with_kwargs(lambda **kw: timm.create_model(name, pretrained=pretrained, **kw), name,
                              model_kwargs, where=where)


class TimmBackend:
    """timm VisionTransformer: blocks[i].attn.qkv -> (q, k) after q_norm / k_norm."""

    forms = "timm:NAME"

    def parse(self, spec: str, rest: str) -> TeacherSpec:
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

    def pretrained(self, spec: TeacherSpec, model_kwargs: dict) -> tuple[nn.Module, str]:
        try:
            return create_timm(spec.model, model_kwargs, pretrained=True), f"pretrained:timm/{spec.model}"
        except OSError as err:  # huggingface_hub raises OSError subclasses when the hub is unreachable
            raise offline_hint(f"timm model '{spec.model}'", err) from err

    def create(self, spec: TeacherSpec, model_kwargs: dict) -> nn.Module:
        return create_timm(spec.model, model_kwargs, pretrained=False)

    def load_state(self, model: nn.Module, state: dict, source: str) -> None:
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if isinstance(model, VisionTransformer):
            # timm's own converter: open_clip/OpenAI CLIP key layouts, pos-embed resampling.
            state = checkpoint_filter_fn(state, model)
        load_into(model, state, source)

    def preprocessing(self, spec: TeacherSpec) -> Preprocessing:
        return Preprocessing(spec.mean, spec.std, spec.interpolation)

    def geometry(self, model: nn.Module, name: str) -> ViTGeometry:
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
        attn = model.blocks[0].attn
        return ViTGeometry(blocks=tuple(model.blocks), num_heads=attn.num_heads, head_dim=attn.head_dim,
                           embed_dim=model.embed_dim, grid=tuple(model.patch_embed.grid_size),
                           img_size=tuple(model.patch_embed.img_size))

    def hook_qk(self, model: nn.Module, layer: int, sink: QKSink):
        attn = model.blocks[layer - 1].attn

        def hook(_module, _inputs, out):  # out [B, N, 3 * H * hd]
            b, n, _ = out.shape
            q, k, _v = out.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            sink(layer, attn.q_norm(q), attn.k_norm(k))  # [B, H, N, hd] each

        return attn.qkv.register_forward_hook(hook)

    def final_tokens(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_features(x)  # [B, N, D] after the final norm
