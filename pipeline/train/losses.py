"""The Hybrid Distill loss (paper Eq. 1, 3) as named terms:

    loss = 1 · SmoothL1(head(S^L), whiten(T_c^L)) + α · SmoothL1(R_S^{mapped}, R_T^{relation layers})
           `features`                               `relations`

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

Terms are data: `LOSS_TERMS` maps a name to `(student_out, batch, ctx) -> scalar`; `term_weights`
gives a run's {name: weight}; `hybrid_loss` returns `loss` (the weighted sum) and `loss_<name>` per
term, and the loop, the run log, plots/loss.csv, metrics.json and the progress line follow those keys.
A new term is one function registered here and its weight in the config (`loss_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence, get_args

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.train.student import HeadRule, pick_relations

TeacherMode = Literal["hybrid", "disc_only", "mim_only"]  # which loss terms: both teachers, features only, MIM only
TEACHER_MODES = get_args(TeacherMode)


@dataclass(frozen=True)
class LossContext:
    """What terms need besides the student's output and the batch (fixed for a run)."""

    blocks: Sequence[int] = ()  # student blocks (1-based) matching the batch's MIM layers, in order (capture_blocks)
    head_rule: HeadRule | None = None  # MaskedStudent.head_rule (relations/attention only)
    beta: float = 1.0  # SmoothL1 β (the L2→L1 switch point, in target units)
    target: str = "relations"  # the batch key of the MIM target: relations | attention | block_features


def whiten(f: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over the last axis: [..., D] -> [..., D] (FD/dBOT whitening)."""
    return F.layer_norm(f, f.shape[-1:])


def features_term(student_out: dict, batch: dict, ctx: LossContext) -> torch.Tensor:
    """SmoothL1 of the student's feature head [B, T, Dt] vs the whitened teacher features (raw in the batch)."""
    pred = student_out["features"].float()  # [B, T, Dt]
    tgt = whiten(batch["features"].float())
    if pred.shape != tgt.shape:
        raise ValueError(f"student features {tuple(pred.shape)} vs teacher features {tuple(tgt.shape)}")
    return F.smooth_l1_loss(pred, tgt, beta=ctx.beta)


def relations_term(student_out: dict, batch: dict, ctx: LossContext) -> torch.Tensor:
    """SmoothL1 of the student's MIM target (`ctx.target`) at `ctx.blocks` vs the batch's, layers in that order:
    [B, n_layers, H, T, T] (heads matched by `ctx.head_rule`) or block features [B, n_layers, T, Dm] (whitened)."""
    pred = pick_relations(student_out, ctx.target, ctx.blocks).float()
    tgt = batch[ctx.target].float()
    if ctx.target == "block_features":  # [B, n_layers, T, Dm]
        tgt = whiten(tgt)
    elif ctx.head_rule is not None:  # [B, n_layers, H, T, T]
        pred = ctx.head_rule.student(pred, heads_dim=2)
        tgt = ctx.head_rule.teacher(tgt, heads_dim=2)
    if pred.shape != tgt.shape:
        raise ValueError(f"student {ctx.target} {tuple(pred.shape)} vs teacher {ctx.target} {tuple(tgt.shape)}")
    return F.smooth_l1_loss(pred, tgt, beta=ctx.beta)


# name -> (student_out, batch, ctx) -> scalar tensor; logged as `loss_<name>`. A new term: one entry here
# (or `LOSS_TERMS["name"] = fn` before the run is built) and its weight in the config's `loss_weights`.
LOSS_TERMS: dict[str, Callable[[dict, dict, LossContext], torch.Tensor]] = {
    "features": features_term,  # discriminative teacher (Eq. 1), weight 1
    "relations": relations_term,  # MIM teacher (Eq. 3), weight α
}


def term_weights(teachers: str = "hybrid", alpha: float = 1.0,
                 loss_weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """A run's {term: weight}, in the order the terms are logged: the teachers mode's terms (features 1,
    relations α; a single term weighs 1), then `loss_weights` ({name: weight} of other registered terms).
    A term weighted 0 is computed and logged but adds nothing to `loss`."""
    if teachers not in TEACHER_MODES:
        raise ValueError(f"teachers must be one of {TEACHER_MODES}, got {teachers!r}")
    weights = {"features": 1.0} if teachers != "mim_only" else {}
    if teachers != "disc_only":
        weights["relations"] = float(alpha) if teachers == "hybrid" else 1.0
    for name, w in (loss_weights or {}).items():
        if name in weights or name not in LOSS_TERMS:
            why = "is set by teachers and alpha" if name in weights else f"is not one of {sorted(LOSS_TERMS)}"
            raise ConfigError(f"loss_weights: loss term {name!r} {why} (pipeline/train/losses.py LOSS_TERMS)")
        weights[name] = float(w)
    return weights


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
    loss_weights: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Hybrid loss for one batch.

    Args:
        student_out: `MaskedStudent.forward` output.
        batch: loader batch; reads `features` [B, T, Dt] (raw) and `relations` / `attention`
            [B, n_layers, Ht, T, T] or `block_features` [B, n_layers, T, Dm], layers in the order of
            `blocks`, and whatever extra terms read.
        blocks, head_rule, beta, target: the `LossContext` of the terms.
        alpha, teachers, loss_weights: the terms and their weights (`term_weights`).
    Returns:
        {"loss": Σ weight · term, "loss_<name>": term (detached), ...} scalar tensors, one entry per
        term of the run in `term_weights` order (a term the teachers mode does not use is absent).
    """
    ctx = LossContext(blocks=blocks, head_rule=head_rule, beta=beta, target=target)
    weights = term_weights(teachers, alpha, loss_weights)
    terms = {name: LOSS_TERMS[name](student_out, batch, ctx) for name in weights}
    loss = sum(weights[name] * value for name, value in terms.items())
    return {"loss": loss, **{f"loss_{name}": value.detach() for name, value in terms.items()}}
