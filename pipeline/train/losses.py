"""The Hybrid Distill loss (paper Eq. 1, 3):

    loss = SmoothL1(head(S^L), whiten(T_c^L)) + α · SmoothL1(R_S^{mapped}, R_T^{relation layers})

over the tokens the student sees: [CLS] + kept patches (T = 1 + n_keep), the CLS token included
in both terms. Each term is the mean over all its elements (batch, tokens, channels / layers,
heads, T×T), so α weighs two per-element averages.

- whiten(f) = LayerNorm without affine over the teacher's channel axis (FD/dBOT), applied here at
  load time because the stores keep raw features.
- `relations`: raw Q·Kᵀ (no 1/√d), the store's convention. Heads are matched by `HeadRule`.
- `attention`: row-stochastic teacher attention over [CLS] + kept, as the loader serves it (a
  `tokens: all` store's rows are renormalized over the kept tokens when gathered, which gives
  exactly the softmax over them), compared with the student's softmax(R·scale) over the same tokens.
- `block_features`: per-layer student block outputs through a linear head vs whitened teacher
  block features, like the final features.
Teachers mode: `hybrid` (both terms), `disc_only` (features only), `mim_only` (MIM term only).
Computed in float32 whatever the autocast dtype of the forward.
"""
from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F

from pipeline.train.student import HeadRule, pick_relations

TeacherMode = Literal["hybrid", "disc_only", "mim_only"]  # which loss terms: both teachers, features only, MIM only
TEACHER_MODES = get_args(TeacherMode)


def whiten(f: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over the last axis: [..., D] -> [..., D] (FD/dBOT whitening)."""
    return F.layer_norm(f, f.shape[-1:])


def hybrid_loss(
    student_out: dict,
    batch: dict,
    *,
    blocks: Sequence[int] = (),
    head_rule: HeadRule | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    target: str = "relations",
    teachers: str = "hybrid",
) -> dict[str, torch.Tensor]:
    """Hybrid loss for one batch.

    Args:
        student_out: `MaskedStudent.forward` output.
        batch: loader batch; reads `features` [B, T, Dt] (raw) and `relations` / `attention`
            [B, n_layers, Ht, T, T] or `block_features` [B, n_layers, T, Dm], layers in the order of
            `blocks`.
        blocks: student blocks (1-based) matching the batch's MIM layers, in the same order
            (`MaskedStudent.capture_blocks`).
        head_rule: `MaskedStudent.head_rule` (relations/attention only).
        alpha: weight of the MIM term.
        beta: SmoothL1 β (the L2→L1 switch point, in target units).
    Returns:
        {"loss", "loss_features", "loss_relations"} scalar tensors; a term not used by the teachers
        mode is 0 (and not part of `loss`).
    """
    if teachers not in TEACHER_MODES:
        raise ValueError(f"teachers must be one of {TEACHER_MODES}, got {teachers!r}")
    zero = torch.zeros((), device=batch["image"].device if "image" in batch else None)
    loss_f = zero
    loss_r = zero
    if teachers in ("hybrid", "disc_only"):
        pred = student_out["features"].float()  # [B, T, Dt]
        tgt = whiten(batch["features"].float())
        if pred.shape != tgt.shape:
            raise ValueError(f"student features {tuple(pred.shape)} vs teacher features {tuple(tgt.shape)}")
        loss_f = F.smooth_l1_loss(pred, tgt, beta=beta)
    if teachers in ("hybrid", "mim_only"):
        pred = pick_relations(student_out, target, blocks).float()
        tgt = batch[target].float()
        if target == "block_features":  # [B, n_layers, T, Dm]
            tgt = whiten(tgt)
        else:  # [B, n_layers, H, T, T]
            if head_rule is not None:
                pred = head_rule.student(pred, heads_dim=2)
                tgt = head_rule.teacher(tgt, heads_dim=2)
        if pred.shape != tgt.shape:
            raise ValueError(f"student {target} {tuple(pred.shape)} vs teacher {target} {tuple(tgt.shape)}")
        loss_r = F.smooth_l1_loss(pred, tgt, beta=beta)
    loss = loss_f + alpha * loss_r if teachers == "hybrid" else (loss_f if teachers == "disc_only" else loss_r)
    return {"loss": loss, "loss_features": loss_f.detach(), "loss_relations": loss_r.detach()}
