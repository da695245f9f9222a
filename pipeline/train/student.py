"""MaskedStudent: a timm ViT that sees only the kept tokens and returns relation and feature outputs.

The student of Hybrid Distill (paper §3.1, Eq. 1) embeds only the unmasked patches M ⊙ x: every
patch is embedded and gets its positional embedding, then the kept ones are gathered, the CLS token
(+ its positional embedding) is prepended, and the blocks run on [CLS] + kept tokens only.

Relations use the store's definition exactly: raw R = Q·Kᵀ per head, no 1/√d scale, computed
after timm's `q_norm`/`k_norm` (identity unless the model has qk-norm). Blocks whose relations are
distilled run a hand-written attention that computes R once and reuses it for the block's own
output, softmax(R·scale) @ V, so attention is never computed twice; every other block keeps timm's
forward (fused SDPA).

Layer mapping (student depth may differ from the teacher's): relation layers are 1-based block
numbers of the teacher and are matched *counted from the end*: teacher block L_t − j ↔ student
block L_s − j. "10, 11" of a 12-block teacher are "4, 5" of a 6-block student. A teacher layer that
maps below student block 1 is an error at startup.

Head rule (student heads Hs ≠ teacher heads Ht): when Ht is a multiple of Hs, each student head is
matched with the mean of Ht/Hs consecutive teacher heads (teacher heads [g·r, (g+1)·r) ↔ student
head g); when Hs is a multiple of Ht, the student's heads are averaged in groups of Hs/Ht down to Ht.
Averages are taken over raw relations (logits) for `relations`, over probabilities for `attention`
(the mean of row-stochastic matrices stays row-stochastic). Any other pair of counts is an error at
startup naming both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from pipeline.errors import ConfigError
from pipeline.targets.layout import MIM_TARGETS
from pipeline.targets.weights import create_with_kwargs



def map_relation_layers(teacher_layers: Sequence[int], teacher_depth: int, student_depth: int) -> dict[int, int]:
    """{teacher block: student block}, 1-based, counted from the end (L_t − j ↔ L_s − j)."""
    out: dict[int, int] = {}
    for lt in teacher_layers:
        if not 1 <= lt <= teacher_depth:
            raise ConfigError(
                f"relation layer {lt} is not a block of the {teacher_depth}-block teacher (valid: 1..{teacher_depth})"
            )
        ls = student_depth - (teacher_depth - lt)
        if ls < 1:
            raise ConfigError(
                f"teacher relation layer {lt} (of {teacher_depth}) maps to student block {ls} (of {student_depth}) "
                f"counting from the end; the student is too shallow: drop that layer from relation_layers "
                f"or use a student with depth >= {teacher_depth - lt + 1}"
            )
        out[lt] = ls
    return out


@dataclass(frozen=True)
class HeadRule:
    """How Hs student heads meet Ht teacher heads; see the module docstring."""

    student_heads: int
    teacher_heads: int

    def __post_init__(self):
        hs, ht = self.student_heads, self.teacher_heads
        if hs <= 0 or ht <= 0 or (ht % hs and hs % ht):
            raise ConfigError(
                f"student has {hs} attention heads and the MIM teacher {ht}: one count must be a multiple of the "
                f"other to average groups of consecutive heads; choose a student with a compatible num_heads "
                f"(model_kwargs: {{num_heads: ...}})"
            )

    @property
    def heads(self) -> int:
        """Number of heads both sides are compared at: min(Hs, Ht)."""
        return min(self.student_heads, self.teacher_heads)

    @staticmethod
    def _group_mean(x: torch.Tensor, heads_dim: int, groups: int) -> torch.Tensor:
        """Mean over consecutive groups of heads along `heads_dim`: [..., H, ...] -> [..., groups, ...]."""
        h = x.shape[heads_dim]
        if h == groups:
            return x
        shape = list(x.shape)
        shape[heads_dim : heads_dim + 1] = [groups, h // groups]
        return x.reshape(shape).mean(dim=heads_dim + 1)

    def student(self, x: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
        """Student relations [.., Hs, T, T] -> [.., min(Hs, Ht), T, T]."""
        return self._group_mean(x, heads_dim, self.heads)

    def teacher(self, x: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
        """Teacher relations [.., Ht, T, T] -> [.., min(Hs, Ht), T, T]."""
        return self._group_mean(x, heads_dim, self.heads)


def _check_vit(model: nn.Module, name: str) -> None:
    """Refuse timm models this student cannot run exactly (wrong block type, registers, no CLS)."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"student model '{name}' is a {type(model).__name__}, not a timm VisionTransformer")
    if getattr(model, "cls_token", None) is None:
        raise ConfigError(f"student model '{name}' has no CLS token; Hybrid Distill needs one (class_token=True)")
    if getattr(model, "reg_token", None) is not None or getattr(model, "num_reg_tokens", 0):
        raise ConfigError(
            f"student model '{name}' has {model.num_reg_tokens} register tokens; the token set of the stores is "
            f"[CLS] + patches, so register tokens are not supported (reg_tokens=0)"
        )
    if model.num_prefix_tokens != 1:
        raise ConfigError(f"student model '{name}' has {model.num_prefix_tokens} prefix tokens; "
                          "exactly 1 (CLS) is needed")
    if not isinstance(model.patch_drop, nn.Identity):
        raise ConfigError(
            f"student model '{name}' was built with patch_drop_rate > 0; token dropping is the distill stage's "
            f"masking here, remove patch_drop_rate from model_kwargs"
        )
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise ConfigError(
                f"student model '{name}' block {i + 1} is "
                f"{type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}; "
                f"relations are captured only from timm's plain Block/Attention"
            )


def _attention_block(blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm `Block.forward` written out so R = Q·Kᵀ is computed once and reused.

    x: [B, T, C] -> (x_out [B, T, C], R [B, H, T, T] raw Q·Kᵀ, P [B, H, T, T] = softmax(R·scale)).
    Mirrors timm 1.0.31 `Attention.forward` (qkv, q_norm/k_norm, attn_drop, norm, gate, proj, proj_drop)
    and `Block.forward` (norm1, ls1, drop_path1, norm2, mlp, ls2, drop_path2).
    """
    attn = blk.attn
    y = blk.norm1(x)
    B, T, _ = y.shape
    gate = attn.gate(y).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(y).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B, H, T, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    rel = q @ k.transpose(-2, -1)  # [B, H, T, T] raw, the store's convention
    prob = (rel * attn.scale).softmax(dim=-1)
    o = attn.attn_drop(prob) @ v  # [B, H, T, hd]
    o = o.transpose(1, 2).reshape(B, T, attn.attn_dim)
    o = attn.norm(o)
    if gate is not None:
        o = o * gate
    o = attn.proj_drop(attn.proj(o))
    x = x + blk.drop_path1(blk.ls1(o))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, rel, prob


class MaskedStudent(nn.Module):
    """timm ViT encoder run on [CLS] + kept tokens, plus the linear distillation head(s).

    Args:
        model: timm model name (any plain VisionTransformer with one CLS token), random init.
        model_kwargs: passed to `timm.create_model` (img_size, patch_size, depth, num_heads, ...).
        feature_dim: width Dt of the discriminative teacher's features; a linear head maps the
            student's final normed tokens to it. None: no feature head (MIM-only distillation).
        relation_layers: teacher block numbers (1-based) whose MIM targets are distilled.
        teacher_depth: depth L_t of the MIM teacher (for the from-the-end layer mapping).
        teacher_heads: head count Ht of the MIM teacher (checked against the student's, see HeadRule).
        mim_target: what is taken at the mapped blocks: `relations` (raw Q·Kᵀ), `attention`
            (softmax of the scaled relations) or `block_features` (block output tokens through a
            per-layer linear head to `mim_dim`).
        mim_dim: MIM teacher width, needed for `block_features`.

    The encoder is built without a classifier (num_classes 0, unless model_kwargs says otherwise):
    distillation trains none, and an exported head of random weights would load as if it were trained.
    """

    def __init__(
        self,
        model: str = "vit_base_patch16_224",
        model_kwargs: dict | None = None,
        feature_dim: int | None = None,
        relation_layers: Sequence[int] = (),
        teacher_depth: int | None = None,
        teacher_heads: int | None = None,
        mim_target: str = "relations",
        mim_dim: int | None = None,
    ):
        super().__init__()
        import timm

        if mim_target not in MIM_TARGETS:
            raise ConfigError(f"mim_target must be one of {list(MIM_TARGETS)}, got {mim_target!r}")
        self.model_name = model
        self.model_kwargs = {"num_classes": 0, **dict(model_kwargs or {})}
        if ":" not in model and not timm.is_model(model):  # checked first: a bad name is not the kwargs' fault
            raise ConfigError(f"student model '{model}': timm has no such model; pass --model NAME of a timm ViT")
        # num_classes 0 is ours, not the user's: only their kwargs make a failure theirs.
        self.vit = create_with_kwargs(
            lambda **kw: timm.create_model(model, pretrained=False, **{"num_classes": 0, **kw}), model,
            dict(model_kwargs or {}))
        _check_vit(self.vit, model)
        for p in self.vit.get_classifier().parameters():
            p.requires_grad_(False)
        self.depth = len(self.vit.blocks)
        self.num_heads = self.vit.blocks[0].attn.num_heads
        self.embed_dim = self.vit.embed_dim
        self.grid = tuple(self.vit.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.mim_target = mim_target

        relation_layers = tuple(relation_layers)
        if relation_layers:
            if teacher_depth is None or teacher_heads is None:
                raise ConfigError("relation_layers given without the MIM teacher's depth and head count")
            self.layer_map = map_relation_layers(relation_layers, teacher_depth, self.depth)
            if len(set(self.layer_map.values())) != len(self.layer_map):
                raise ConfigError(f"relation layers {relation_layers} map to repeated student blocks {self.layer_map}")
            if mim_target != "block_features":
                self.head_rule: HeadRule | None = HeadRule(self.num_heads, teacher_heads)
            else:
                self.head_rule = None
        else:
            self.layer_map = {}
            self.head_rule = None
        # 1-based student blocks whose outputs are captured, in the teacher layers' order.
        self.capture_blocks = tuple(self.layer_map[lt] for lt in relation_layers)

        self.feature_head = nn.Linear(self.embed_dim, feature_dim) if feature_dim else None
        if mim_target == "block_features" and relation_layers:
            if not mim_dim:
                raise ConfigError("mim_target 'block_features' needs the MIM teacher's width (mim_dim)")
            self.block_heads = nn.ModuleDict({str(b): nn.Linear(self.embed_dim, mim_dim) for b in self.capture_blocks})
        else:
            self.block_heads = None

    def embed(self, images: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W], keep_index [B,n] (sorted patch ids, CLS excluded) -> tokens [B, 1+n, C]."""
        vit = self.vit
        x = vit.patch_embed(images)  # [B, N, C], or [B, gh, gw, C] with dynamic_img_size
        pos = vit.pos_embed  # [1, N(+1), C]
        if x.ndim == 4:
            B, gh, gw, C = x.shape
            if (gh, gw) != tuple(vit.patch_embed.grid_size):
                from timm.layers import resample_abs_pos_embed

                pos = resample_abs_pos_embed(
                    pos, new_size=(gh, gw), old_size=vit.patch_embed.grid_size,
                    num_prefix_tokens=0 if vit.no_embed_class else 1,
                )
            x = x.reshape(B, gh * gw, C)
        if vit.no_embed_class:  # pos_embed covers patches only; the CLS token carries none
            cls = vit.cls_token
            x = x + pos
        else:
            cls = vit.cls_token + pos[:, :1]
            x = x + pos[:, 1:]
        B, N, C = x.shape
        if keep_index.shape[1] != N:  # M ⊙ x: gather the kept patch tokens
            idx = keep_index.long().unsqueeze(-1).expand(-1, -1, C)
            x = torch.gather(x, 1, idx)  # [B, n, C]
        x = torch.cat([cls.expand(B, -1, -1).to(x.dtype), x], dim=1)  # [B, 1+n, C]
        return vit.norm_pre(vit.pos_drop(x))

    def forward(self, images: torch.Tensor, keep_index: torch.Tensor) -> dict:
        """images [B,3,H,W], keep_index long [B,n] -> dict:
        - `tokens`: [B, 1+n, Cs] final tokens after the final norm (what timm's forward_features gives);
        - `features`: [B, 1+n, Dt] = feature_head(tokens), or None without a feature head;
        - `relations`: {student block: [B, Hs, 1+n, 1+n]} raw Q·Kᵀ (mim_target `relations`);
        - `attention`: {student block: [B, Hs, 1+n, 1+n]} softmax(R·scale) (mim_target `attention`);
        - `block_features`: {student block: [B, 1+n, Dm]} block output through its head.
        """
        x = self.embed(images, keep_index)
        rel: dict[int, torch.Tensor] = {}
        att: dict[int, torch.Tensor] = {}
        blk_feats: dict[int, torch.Tensor] = {}
        capture = set(self.capture_blocks)
        last = max(capture) if capture else 0
        # Without a feature head (MIM only), blocks after the last captured one feed nothing.
        depth = self.depth if self.feature_head is not None or not capture else last
        for i, blk in enumerate(self.vit.blocks[:depth], start=1):
            if i in capture and self.mim_target in ("relations", "attention"):
                x, r, p = _attention_block(blk, x)
                if self.mim_target == "relations":
                    rel[i] = r
                else:
                    att[i] = p
            else:
                x = blk(x)
                if i in capture:
                    blk_feats[i] = self.block_heads[str(i)](x)
        out: dict = {"relations": rel, "attention": att, "block_features": blk_feats}
        if depth == self.depth:
            tokens = self.vit.norm(x)
            out["tokens"] = tokens
            out["features"] = self.feature_head(tokens) if self.feature_head is not None else None
        else:
            out["tokens"] = None
            out["features"] = None
        return out

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The timm model's own state dict (timm key names), without the distillation heads."""
        return {k: v.detach().clone().contiguous() for k, v in self.vit.state_dict().items()}


def pick_relations(out: dict, mim_target: str, blocks: Sequence[int]) -> torch.Tensor:
    """Stack the student's captured MIM outputs in `blocks` order: [B, n_layers, ...]."""
    source = out[mim_target]
    missing = [b for b in blocks if b not in source]
    if missing:
        raise ConfigError(f"student did not capture {mim_target} at blocks {missing}")
    return torch.stack([source[b] for b in blocks], dim=1)

