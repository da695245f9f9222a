"""Teachers for the quality study, pretrained here (no model hub): a MIM teacher and a supervised one.

Both are timm ViTs of the study's geometry (`vit_tiny_patch16_224` with img_size 28, patch 4: a
7x7 grid, 192-d, 3 heads, `depth` blocks), saved as plain encoder state dicts (timm keys, no
classifier) that `hdpipe extract --checkpoint` loads with `model_kwargs: {num_classes: 0, ...}`.

- MIM teacher (MAE recipe, He et al. 2022): 75% of patches masked at random per image, the
  encoder sees the rest (+ CLS), a small decoder (4 blocks, 128-d) predicts the masked patches'
  per-patch-normalized pixels; MSE on masked patches only. AdamW (0.9, 0.95), wd 0.05, warmup +
  cosine; flip augmentation.
- Supervised teacher (the discriminative one, DeiT's role): cross-entropy with label smoothing 0.1
  on the labeled train split; random crop (pad 2) + flip.
Inputs are normalized with Fashion-MNIST's own mean/std (the teachers' preprocessing; extraction
passes it with --mean/--std).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = (0.2860,) * 3, (0.3530,) * 3  # Fashion-MNIST pixel statistics (train split), per channel


def encoder(depth: int, num_classes: int = 0):
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, depth=depth, num_classes=num_classes)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _augment(x: torch.Tensor, rng: np.random.Generator, crop: bool) -> torch.Tensor:
    """Flip half the batch; with `crop`, a random 28x28 crop of the image padded by 2 (reflect)."""
    flip = torch.as_tensor(rng.random(len(x)) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if crop:
        padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
        dy, dx = rng.integers(0, 5, 2)
        x = padded[:, :, dy:dy + 28, dx:dx + 28]
    return x


def _schedule(opt, step: int, total: int, warmup: int, lr: float) -> None:
    value = (lr * (step + 1) / warmup if step < warmup
             else lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    for g in opt.param_groups:
        g["lr"] = value


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: encoder tokens -> 128-d, mask tokens, positions, 4 blocks -> pixels."""

    def __init__(self, num_patches: int, enc_dim: int = 192, dim: int = 128, depth: int = 4, patch_pixels: int = 48):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, 4, mlp_ratio=4.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor, num_patches: int) -> torch.Tensor:
        """tokens [B, 1 + n_keep, E] (CLS first), keep [B, n_keep] -> pixels [B, P, patch_pixels]."""
        x = self.embed(tokens)
        b, _, d = x.shape
        full = self.mask_token.expand(b, num_patches, d).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full], 1) + self.pos
        return self.pred(self.norm(self.blocks(x)))[:, 1:]


def _patches(x: torch.Tensor, p: int = 4) -> torch.Tensor:
    """[B, 3, 28, 28] -> [B, 49, p*p*3], row-major patches (the ViT token order)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def pretrain_mae(images: np.ndarray, depth: int, epochs: int, batch: int = 128, lr: float = 1.5e-3,
                 mask_ratio: float = 0.75, seed: int = 0) -> tuple[dict, dict]:
    """images uint8 [N, 28, 28] -> (encoder state dict, log)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc = encoder(depth)
    dec = MAEDecoder(enc.patch_embed.num_patches)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    data = torch.from_numpy(np.array(images)).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    steps = epochs * (len(data) // batch)
    P = enc.patch_embed.num_patches
    n_keep = int(round(P * (1 - mask_ratio)))
    log, step, t0 = [], 0, time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(data))
        total = 0.0
        for i in range(len(data) // batch):
            x = _augment(data[order[i * batch:(i + 1) * batch]], rng, crop=False)
            keep = torch.as_tensor(np.sort(np.argsort(rng.random((len(x), P)), axis=1)[:, :n_keep], axis=1))
            t = enc.patch_embed(_normalize(x)) + enc.pos_embed[:, 1:]
            t = torch.gather(t, 1, keep[..., None].expand(-1, -1, t.shape[-1]))
            t = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(len(x), -1, -1), t], 1)
            t = enc.norm(enc.blocks(enc.norm_pre(t)))
            pred = dec(t, keep, P)
            target = _patches(x)
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
            masked = torch.ones(len(x), P, dtype=torch.bool)
            masked.scatter_(1, keep, False)
            loss = ((pred - target) ** 2).mean(-1)[masked].mean()
            _schedule(opt, step, steps, len(data) // batch, lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total += loss.item()
        log.append({"epoch": epoch, "loss": total / (len(data) // batch), "seconds": time.perf_counter() - t0})
    return {k: v.detach().clone() for k, v in enc.state_dict().items()}, {"epochs": log}


def pretrain_supervised(images: np.ndarray, labels: np.ndarray, depth: int, epochs: int, batch: int = 128,
                        lr: float = 1e-3, seed: int = 0) -> tuple[dict, dict]:
    """images uint8 [N, 28, 28], labels [N] -> (encoder state dict without the head, log)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = encoder(depth, num_classes=int(labels.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    data = torch.from_numpy(np.array(images)).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    target = torch.from_numpy(labels.astype(np.int64))
    steps = epochs * (len(data) // batch)
    log, step, t0 = [], 0, time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(data))
        total, correct = 0.0, 0
        for i in range(len(data) // batch):
            idx = order[i * batch:(i + 1) * batch]
            logits = model(_normalize(_augment(data[idx], rng, crop=True)))
            loss = F.cross_entropy(logits, target[idx], label_smoothing=0.1)
            _schedule(opt, step, steps, len(data) // batch, lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total += loss.item()
            correct += int((logits.argmax(1) == target[idx]).sum())
        n = (len(data) // batch) * batch
        log.append({"epoch": epoch, "loss": total / (len(data) // batch), "train_top1": correct / n,
                    "seconds": time.perf_counter() - t0})
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    return state, {"epochs": log}
