"""The paper's recipe: AdamW with decoupled weight decay, linear-scaled lr, per-step warmup + cosine.

    lr = base_lr * global_batch / 1024        (base_lr 6e-4, global_batch = per-device batch
                                               × accumulation steps × world size)

No weight decay on 1-d parameters (norm weights, every bias, layer-scale gammas), `pos_embed` and
`cls_token` (as MAE/timm do); the linear distillation heads' weight matrices do decay like any
other linear weight. Frozen parameters (timm's classifier head) are left out.
"""
from __future__ import annotations

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
    """Per-optimizer-step schedule: timm's `CosineLRScheduler` stepped per update (linear warmup
    0 → lr over `warmup_steps`, then cosine to `min_lr` over the remaining steps): MAE's
    `adjust_learning_rate` per iteration (lr 0 at step 0). Kept as this small face because the loop
    and fine-tuning call `step()` after each optimizer step and log `get_lr()`, and a checkpoint
    needs only the step count (`state_dict`), not timm's whole attribute dict.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int,
                 min_lr: float = 0.0):
        from timm.scheduler import CosineLRScheduler

        for group in optimizer.param_groups:  # timm's base value; `lr_scale` (layer decay) applies on top
            group["lr"] = lr
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = max(self.warmup_steps + 1, int(total_steps))
        self.lr, self.min_lr, self.step_count = lr, min_lr, 0
        self._timm = CosineLRScheduler(optimizer, t_initial=self.total_steps - self.warmup_steps, lr_min=min_lr,
                                       warmup_t=self.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True,
                                       t_in_epochs=False)
        self._timm.step_update(0)

    def value(self, step: int) -> float:
        """lr at optimizer step `step` (0-based), before any `lr_scale`."""
        return self._timm._get_values(step, on_epoch=False)[0]

    def get_lr(self) -> float:
        return self.value(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._timm.step_update(self.step_count)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "min_lr": self.min_lr}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._timm.step_update(self.step_count)


def clip_gradients(model: nn.Module, max_norm: float | None) -> float | None:
    """Clip the global grad norm to `max_norm` (None or ≤0: no clipping); returns the norm before."""
    if not max_norm or max_norm <= 0:
        return None
    params = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
