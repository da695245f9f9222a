"""Token resampling: each step shows the student a seeded subset of its view's stored tokens.

A stored view holds targets over [CLS] + n kept patch tokens. With fraction F < 1 the student sees
[CLS] + m of them, m = max(1, round_half_up(F·n)), a different subset for every (epoch, sample),
and the targets are cut to the same tokens. That is exact, not an approximation: relations are raw
Q·Kᵀ (a subset of tokens is a sub-matrix), attention rows renormalized over the subset are the
softmax over it, and features are per token. So one stored view gives many student inputs (each
token in another context) at no storage cost.

The subset of sample `index` in `epoch` is a pure function of (seed, epoch, index, n, F): the same
in every worker, rank, resumed run and in online mode, so cached and online runs stay comparable
and a mid-epoch resume replays it. Positions are sorted, so kept tokens keep their order.
"""
from __future__ import annotations

import math

import numpy as np

RESAMPLE_STREAM = 0x70CE5  # separates these draws from the view and mask streams of the same seed


def resampled_count(n: int, fraction: float) -> int:
    """Patch tokens shown of n stored: round half up of F·n, at least 1 (all of them at F = 1)."""
    return n if fraction >= 1 else max(1, min(n, math.floor(fraction * n + 0.5)))


def token_subset(seed: int, epoch: int, index: int, n: int, fraction: float) -> np.ndarray:
    """Sorted int64 [m] positions (0-based among the n stored patch tokens) sample `index` shows."""
    m = resampled_count(n, fraction)
    if m == n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, index, RESAMPLE_STREAM])
    return np.sort(rng.permutation(n)[:m]).astype(np.int64)


def token_positions(subset: np.ndarray) -> np.ndarray:
    """int64 [1 + m]: positions on the stored token axis ([CLS] first) of [CLS] + the subset."""
    return np.concatenate([[0], np.asarray(subset, dtype=np.int64) + 1])


def resample_batch(batch: dict, fraction: float, seed: int, epoch: int) -> dict:
    """The batch cut to each sample's subset (torch tensors on any device): `keep_index` [B, n] ->
    [B, m]; `relations` / `attention` [B, L, H, T, T] and `block_features` [B, L, T, D] and
    `features` [B, T, D] over T = 1 + n tokens -> 1 + m (attention rows renormalized).

    Online runs call it on the teachers' fresh targets; cached runs cut each sample in the loader
    worker (`pipeline.train.shard_rows`) with the same `token_subset`, so both see the same tokens."""
    import torch

    from pipeline.train.target_rows import cut_tokens

    keep = batch["keep_index"]
    n = keep.shape[1]
    if resampled_count(n, fraction) == n:
        return batch
    index = batch["index"].tolist()
    sub = torch.as_tensor(np.stack([token_subset(seed, epoch, int(i), n, fraction) for i in index]),
                          device=keep.device)  # [B, m]
    tok = torch.cat([torch.zeros_like(sub[:, :1]), sub + 1], dim=1)  # [B, 1 + m]
    out = dict(batch)
    out["keep_index"] = keep.gather(1, sub)
    for name in ("relations", "attention", "block_features", "features"):
        if name in batch:
            out[name] = cut_tokens(name, batch[name], tok)
    return out
