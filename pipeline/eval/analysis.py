"""Attention and representation properties of a ViT: the papers' property analysis as pure functions.

Definitions (hybrid-distillation §2.1, understanding-masked-distillation §4):

- Attention probabilities `attn` [B, H, N, N] are the softmax of the scaled relations
  (Q·Kᵀ / √d_head) with queries on axis 2 and keys on axis 3, N = prefix + h·w tokens.
- **CLS / prefix handling.** Only patch tokens count: the `num_prefix` leading tokens (CLS, and
  registers where a model has them) are dropped as queries *and* as keys, and each query row is
  renormalized over the patch keys. CLS has no position on the grid, so it could not enter a distance,
  and keeping it as a key would let the usual "attention sink" on CLS dominate NMI and entropy.
- Every per-image quantity is computed per head and averaged over images (and over queries where the
  definition is per query), so results are [H] per layer and do not depend on batch size.

All functions are batched torch and run on whatever device the input lives on; reductions are done
in float32, singular values in float64 (see `_singular_values`).
"""
from __future__ import annotations

import math
from typing import Literal

import torch

# Relative log singular values are floored here (natural log): a rank-deficient layer (e.g. a
# random-init model with fewer tokens than channels) would otherwise give -inf, which neither JSON
# nor a plot can hold. exp(-30) ≈ 1e-13 of the largest singular value, below float32 resolution.
LOG_SV_FLOOR = -30.0


def attention_probs(relations: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, H, N, N] raw Q·Kᵀ relations (the teachers' contract: no 1/√d) -> softmax probabilities."""
    return torch.softmax(relations.float() * (head_dim ** -0.5), dim=-1)


def patch_attention(attn: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """Drop the `num_prefix` leading tokens as queries and keys; renormalize each row over patch keys.

    [B, H, N, N] -> [B, H, P, P] with P = N - num_prefix. A row whose whole mass sat on prefix
    keys (sum 0 over patches) stays all-zero rather than dividing by zero; it then contributes
    distance 0 and entropy 0, which is what "attends to no patch" means.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be [B, H, N, N], got {tuple(attn.shape)}")
    a = attn[:, :, num_prefix:, num_prefix:].float()
    total = a.sum(dim=-1, keepdim=True)
    return a / total.clamp_min(torch.finfo(a.dtype).tiny)


def patch_positions(grid: tuple[int, int], patch_px: float | tuple[float, float], device=None) -> torch.Tensor:
    """Centers of the h×w patches in pixels, row-major (the ViT token order): [h·w, 2] as (y, x)."""
    h, w = grid
    py, px = (patch_px, patch_px) if isinstance(patch_px, (int, float)) else patch_px
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * py
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * px
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)


def pairwise_patch_distance(grid: tuple[int, int], patch_px: float | tuple[float, float], device=None) -> torch.Tensor:
    """Euclidean distance in pixels between every pair of patch centers: [P, P]."""
    pos = patch_positions(grid, patch_px, device=device)
    return torch.cdist(pos, pos)


def _check_grid(attn: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> None:
    n = attn.shape[-1]
    if n - num_prefix != grid[0] * grid[1]:
        raise ValueError(
            f"attention has {n} tokens but grid {grid[0]}x{grid[1]} + {num_prefix} prefix token(s) "
            f"makes {grid[0] * grid[1] + num_prefix}"
        )


def attention_distance(
    attn: torch.Tensor, grid: tuple[int, int], patch_px: float | tuple[float, float], num_prefix: int = 1
) -> torch.Tensor:
    """Average attention distance in pixels per head: [B, H, N, N] -> [H].

    mean over images b and patch queries q of Σ_k a(q, k) · ‖pos(q) − pos(k)‖, with `a` the
    patch-renormalized attention (see module docstring) and pos the patch centers in pixels.
    """
    _check_grid(attn, grid, num_prefix)
    a = patch_attention(attn, num_prefix)  # [B, H, P, P]
    dist = pairwise_patch_distance(grid, patch_px, device=a.device)  # [P, P]
    per_query = (a * dist).sum(dim=-1)  # [B, H, P]
    return per_query.mean(dim=(0, 2))


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """-Σ p log p along `dim` in nats, with 0·log 0 = 0."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=dim)


def attention_entropy(attn: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """Mean entropy (nats) of each patch query's attention over patch keys: [B, H, N, N] -> [H].

    Uniform attention over P patches gives log P; one-hot attention gives 0.
    """
    a = patch_attention(attn, num_prefix)
    return _entropy(a).mean(dim=(0, 2))


def attention_nmi(attn: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """Normalized mutual information between query and key positions per head: [B, H, N, N] -> [H].

    Per image: p(q) = 1/P (uniform queries), p(k|q) = a(q, k), p(k) = mean_q a(q, k);
    I(q, k) = H(k) − mean_q H(k|q); NMI = I / √(H(q) H(k)) with H(q) = log P. Averaged over
    images. Uniform attention gives 0, one-hot attention to distinct keys (e.g. self) gives 1.
    When every query attends one and the same key, H(k) = I = 0 and NMI is taken as 0.
    """
    a = patch_attention(attn, num_prefix)  # [B, H, P, P]
    p = a.shape[-1]
    if p < 2:
        raise ValueError("NMI needs at least two patch tokens")
    pk = a.mean(dim=2)  # [B, H, P] key marginal
    h_k = _entropy(pk)  # [B, H]
    h_k_given_q = _entropy(a).mean(dim=2)  # [B, H]
    mi = (h_k - h_k_given_q).clamp_min(0.0)  # rounding can make it a hair negative
    h_q = math.log(p)
    nmi = mi / torch.sqrt(h_q * h_k).clamp_min(1e-12)
    return nmi.mean(dim=0)


def _singular_values(m: torch.Tensor) -> torch.Tensor:
    """Singular values [batch, min(n, d)], descending, of m [batch, n, d].

    Computed as the square roots of the eigenvalues of the smaller Gram matrix (m·mᵀ or mᵀ·m) in
    float64: a symmetric eigensolve of a 197×197 matrix is several times faster than an SVD of the
    197×768 matrix on CPU, and float64 keeps the small values (relative error ~1e-8 of σ_1, far
    below the LOG_SV_FLOOR) that squaring would lose in float32.
    """
    x = m.double()
    gram = x @ x.mT if x.shape[1] <= x.shape[2] else x.mT @ x  # [batch, r, r]
    eig = torch.linalg.eigvalsh(gram)  # ascending
    return eig.flip(-1).clamp_min(0.0).sqrt().float()


def singular_spectrum(
    tokens: torch.Tensor,
    level: Literal["token", "image"] = "token",
    num_prefix: int = 1,
    pooling: Literal["mean", "cls"] = "mean",
    center: bool = True,
) -> torch.Tensor:
    """Relative log singular values log σ_i − log σ_1 (natural log, descending), as in the papers' figures.

    tokens: [B, N, D] one layer's output for B images, the `num_prefix` leading tokens being CLS/registers.
    - level="token": per image, the SVD of its P = N − num_prefix patch tokens [P, D] (CLS excluded,
      it is not a spatial token); the relative log spectra are averaged over images -> [r],
      r = min(P - 1, D) when centered (centering removes one dimension), min(P, D) otherwise.
    - level="image": one SVD over the B image embeddings [B, D], each the mean of its patch tokens
      (pooling="mean") or its CLS token (pooling="cls") -> [min(B - 1, D)] centered. Needs B ≥ 2.
    center: subtract the mean row first (tokens of the image / embeddings of the set), so the
    spectrum measures the spread ("volume") of the representation rather than its offset.
    Values are floored at LOG_SV_FLOOR so rank-deficient inputs stay finite.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got {tuple(tokens.shape)}")
    x = tokens.float()
    if level == "token":
        m = x[:, num_prefix:, :]  # [B, P, D]
    elif level == "image":
        if pooling == "mean":
            m = x[:, num_prefix:, :].mean(dim=1)
        elif pooling == "cls":
            if num_prefix < 1:
                raise ValueError("pooling='cls' needs a CLS token (num_prefix >= 1)")
            m = x[:, 0, :]
        else:
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if m.shape[0] < 2:
            raise ValueError("an image-level spectrum needs at least 2 images")
        m = m.unsqueeze(0)  # [1, B, D]
    else:
        raise ValueError(f"level must be 'token' or 'image', got {level!r}")
    rank = min(m.shape[1], m.shape[2])
    if center:
        m = m - m.mean(dim=1, keepdim=True)
        # Centering n rows leaves rank <= n - 1: the last singular value is exactly 0 in theory and
        # float rounding noise in practice, so it is dropped rather than reported.
        rank = min(m.shape[1] - 1, m.shape[2])
    s = _singular_values(m)[:, :rank]  # [batch, r] descending
    logs = torch.log(s.clamp_min(torch.finfo(s.dtype).tiny))
    rel = (logs - logs[:, :1]).clamp_min(LOG_SV_FLOOR)
    return rel.mean(dim=0)
