"""The paper's recipe: AdamW with decoupled weight decay, linear-scaled lr, per-step warmup + cosine.

    lr = base_lr * global_batch / 1024        (base_lr 6e-4, global_batch = per-device batch
                                               × accumulation steps × world size)

No weight decay on 1-d parameters (norm weights, every bias, layer-scale gammas), `pos_embed` and
`cls_token` (as MAE/timm do); the linear distillation heads' weight matrices do decay like any
other linear weight. Frozen parameters (timm's classifier head) are left out.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

BASE_BATCH = 1024  # the batch at which base_lr is defined (paper: 6e-4 at 1024)
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """lr = base_lr * global_batch / 1024."""
    return base_lr * global_batch / BASE_BATCH


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (≥2-d weights) and not decayed (1-d params, pos_embed, cls_token)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over `param_groups`; betas (0.9, 0.95) as in MAE/FD pre-training."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


class WarmupCosine:
    """Per-optimizer-step schedule: linear warmup 0 → lr over `warmup_steps`, then cosine to `min_lr`.

    `step()` is called after each optimizer step and sets the lr of every group for the next one;
    `state_dict()` holds the step count so a resumed run continues the same curve.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.lr = lr
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_lr = min_lr
        self.step_count = 0
        self._apply()

    def value(self, step: int) -> float:
        """lr at optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def _apply(self) -> None:
        lr = self.value(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # timm's layer-wise decay groups carry their scale

    def get_lr(self) -> float:
        return self.value(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "min_lr": self.min_lr}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def clip_gradients(model: nn.Module, max_norm: float | None) -> float | None:
    """Clip the global grad norm to `max_norm` (None or ≤0: no clipping); returns the norm before."""
    if not max_norm or max_norm <= 0:
        return None
    params = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
