"""Token masks: which patch tokens the student sees (Hybrid Distillation §3.2, Tab. 8 / A5).

Every strategy returns sorted 0-based patch indices (the CLS/prefix token is excluded and always
kept by the consumer) as a LongTensor [B, n_keep], with the same n_keep for every view, so masks
stack into one array:

- `progressive`: at the MIM teacher's hidden layers I = {0, L/3, 2L/3} (`mask_layers`), among the
  patch tokens still kept, drop round(K * n) tokens most cosine-similar to the mean kept token
  (K = 0.3: 196 -> 137 -> 96 -> 67).
- `direct`: the same redundancy rule applied once, at the teacher's final block output, dropping
  straight down to the progressive count.
- `random`: a uniform subset of the progressive count, seeded by (seed, index, view id).
- `none`: every patch token.

Rounding is half-up (floor(K * n + 0.5)), not Python's banker's rounding, so the count sequence
does not depend on n's parity.
"""
from __future__ import annotations

import math
from typing import Iterable, Literal, Mapping, Sequence, get_args

import numpy as np
import torch

from pipeline.errors import ConfigError

Masking = Literal["progressive", "direct", "random", "none"]  # the token masks a student can be trained with
MASKINGS = get_args(Masking)

# Extra entropy word for random masks, so a random mask seeded like the view plan
# ([seed, index, view]) does not reuse the view plan's stream.
_RANDOM_MASK_STREAM = 0x6D61736B  # "mask"


def mask_layers(depth: int) -> tuple[int, int, int]:
    """Hidden layers (0-based input-to-block numbering) where progressive masking drops tokens."""
    return (0, depth // 3, 2 * depth // 3)


def _n_drop(n: int, ratio: float) -> int:
    return int(math.floor(ratio * n + 0.5))


def kept_count(num_patches: int, ratio: float, stages: int = 3) -> int:
    """Patch tokens left after `stages` rounds of dropping round(ratio * n) (196, 0.3, 3 -> 67)."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"mask ratio must be in [0, 1), got {ratio}")
    n = num_patches
    for _ in range(stages):
        n -= _n_drop(n, ratio)
    return n


def _redundant_order(tokens: torch.Tensor) -> torch.Tensor:
    """Rank tokens by redundancy. tokens [B, n, D] -> LongTensor [B, n] positions, most redundant first.

    Redundancy = cosine similarity to the mean of the given tokens, computed in float64 so that
    the order does not depend on batch composition or accumulation order. Ties keep the lower
    position first (stable sort), i.e. among equally redundant tokens the lower index is dropped.
    """
    x = tokens.double()
    mean = x.mean(dim=1, keepdim=True)  # [B, 1, D]
    sim = torch.nn.functional.cosine_similarity(x, mean, dim=-1)  # [B, n]
    return torch.sort(sim, dim=1, descending=True, stable=True).indices


def progressive_keep(
    hidden: Mapping[int, torch.Tensor],
    layers: Sequence[int],
    ratio: float,
    num_prefix: int = 1,
) -> torch.Tensor:
    """Progressive redundant token masking. hidden {layer: [B, N, D]} (N = num_prefix + patches).

    At each layer in `layers` (in the given order), among the patch tokens still kept, the
    round(ratio * n) tokens most cosine-similar to the mean kept patch token at that layer are
    dropped. Returns LongTensor [B, kept_count(P, ratio, len(layers))], sorted, 0-based patch indices.
    """
    if not layers:
        raise ConfigError("progressive masking needs at least one hidden layer")
    missing = [layer for layer in layers if layer not in hidden]
    if missing:
        raise ConfigError(f"progressive masking: hidden states for layers {missing} were not computed")
    first = hidden[layers[0]]
    batch, n_tokens = first.shape[0], first.shape[1]
    num_patches = n_tokens - num_prefix
    kept_count(num_patches, ratio, len(layers))  # validates the ratio
    keep = torch.arange(num_patches, device=first.device).expand(batch, num_patches)  # [B, n]
    for layer in layers:
        patches = hidden[layer][:, num_prefix:, :]  # [B, P, D]
        kept_tokens = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # [B, n, D]
        n = keep.shape[1]
        order = _redundant_order(kept_tokens)  # [B, n] positions into keep, most redundant first
        survivors = order[:, _n_drop(n, ratio):]  # [B, n - n_drop]
        keep = torch.gather(keep, 1, survivors)
        keep = torch.sort(keep, dim=1).values
    return keep.long()


def direct_keep(last_hidden: torch.Tensor, n_keep: int, num_prefix: int = 1) -> torch.Tensor:
    """One-shot redundant token masking at the teacher's final block output ([B, N, D]).

    Drops the P - n_keep patch tokens most cosine-similar to the mean patch token, in one step, so
    the result has the same count as progressive masking when n_keep = kept_count(P, ratio).
    Returns LongTensor [B, n_keep] sorted 0-based patch indices; ties as in `progressive_keep`.
    """
    patches = last_hidden[:, num_prefix:, :]  # [B, P, D]
    num_patches = patches.shape[1]
    if not 0 < n_keep <= num_patches:
        raise ConfigError(f"direct masking: n_keep must be in 1..{num_patches}, got {n_keep}")
    order = _redundant_order(patches)
    keep = order[:, num_patches - n_keep:]
    return torch.sort(keep, dim=1).values.long()


def random_keep(
    batch_indices: Iterable[int],
    view_ids: Iterable[int],
    num_patches: int,
    n_keep: int,
    seed: int,
) -> torch.Tensor:
    """Uniform random masks, each a pure function of (seed, sample index, view id).

    Returns LongTensor [B, n_keep] (CPU) sorted 0-based patch indices.
    """
    if not 0 < n_keep <= num_patches:
        raise ConfigError(f"random masking: n_keep must be in 1..{num_patches}, got {n_keep}")
    rows = []
    for index, view_id in zip(batch_indices, view_ids, strict=True):
        rng = np.random.default_rng([int(seed), int(index), int(view_id), _RANDOM_MASK_STREAM])
        rows.append(np.sort(rng.permutation(num_patches)[:n_keep]))
    return torch.from_numpy(np.stack(rows).astype(np.int64)) if rows else torch.empty(0, n_keep, dtype=torch.long)
