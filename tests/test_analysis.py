"""Closed-form and independent checks of the attention / representation metrics (pipeline/eval/analysis.py)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.eval import analysis


def _with_prefix(patch_attn: torch.Tensor, num_prefix: int, leak: float = 0.0) -> torch.Tensor:
    """Embed [B, H, P, P] patch attention into [B, H, prefix+P, prefix+P] rows that sum to 1.

    `leak` of each patch query's mass goes to the prefix keys, so the metric must renormalize it away;
    prefix queries get arbitrary (uniform) rows that the metric must ignore.
    """
    b, h, p, _ = patch_attn.shape
    n = p + num_prefix
    full = torch.full((b, h, n, n), 1.0 / n)
    if num_prefix:
        full[:, :, num_prefix:, :num_prefix] = leak / num_prefix
    full[:, :, num_prefix:, num_prefix:] = patch_attn * (1.0 - leak)
    return full


def _pairwise_px(grid, patch_px):
    """Independent pairwise center distances with plain Python loops."""
    h, w = grid
    cells = [(y, x) for y in range(h) for x in range(w)]
    d = np.zeros((len(cells), len(cells)))
    for i, (y0, x0) in enumerate(cells):
        for j, (y1, x1) in enumerate(cells):
            d[i, j] = math.hypot((y0 - y1) * patch_px, (x0 - x1) * patch_px)
    return d


@pytest.mark.parametrize("grid,patch_px,num_prefix", [((4, 4), 16, 1), ((3, 5), 8, 0), ((6, 2), 14, 2)])
def test_uniform_attention(grid, patch_px, num_prefix):
    p = grid[0] * grid[1]
    heads = 3
    attn = _with_prefix(torch.full((2, heads, p, p), 1.0 / p), num_prefix, leak=0.3 if num_prefix else 0.0)
    dist = analysis.attention_distance(attn, grid, patch_px, num_prefix=num_prefix)
    expected = _pairwise_px(grid, patch_px).mean()
    assert dist.shape == (heads,)
    torch.testing.assert_close(dist, torch.full((heads,), expected, dtype=torch.float32), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(analysis.attention_nmi(attn, num_prefix), torch.zeros(heads), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        analysis.attention_entropy(attn, num_prefix), torch.full((heads,), math.log(p)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_self_attention_one_hot(num_prefix):
    grid = (5, 4)
    p = 20
    attn = _with_prefix(torch.eye(p).expand(3, 2, p, p).clone(), num_prefix, leak=0.5 if num_prefix else 0.0)
    torch.testing.assert_close(analysis.attention_distance(attn, grid, 16, num_prefix), torch.zeros(2))
    torch.testing.assert_close(analysis.attention_nmi(attn, num_prefix), torch.ones(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(analysis.attention_entropy(attn, num_prefix), torch.zeros(2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("offset", [(0, 1), (2, 0), (1, 2), (3, 3)])
def test_fixed_offset_distance(offset):
    """Each query attends the patch `offset` away, reflected (±) per axis to stay inside the grid,
    so every query's key lies exactly ‖offset‖·patch_px away."""
    grid, patch_px = (7, 8), 16
    h, w = grid
    dy, dx = offset
    p = h * w
    a = torch.zeros(1, 1, p, p)
    for y, x in itertools.product(range(h), range(w)):
        ky = y + dy if y + dy < h else y - dy
        kx = x + dx if x + dx < w else x - dx
        assert 0 <= ky < h and 0 <= kx < w
        a[0, 0, y * w + x, ky * w + kx] = 1.0
    attn = _with_prefix(a, 1, leak=0.2)
    dist = analysis.attention_distance(attn, grid, patch_px, num_prefix=1)
    assert dist.item() == pytest.approx(math.hypot(dy, dx) * patch_px, rel=1e-5)


def test_nmi_entropy_match_joint_distribution_definition():
    """Random attention: NMI from the module equals I(q,k)/sqrt(H(q)H(k)) from the joint p(q,k) in numpy."""
    g = torch.Generator().manual_seed(0)
    b, h, n = 3, 4, 17
    attn = torch.softmax(torch.randn(b, h, n, n, generator=g) * 3.0, dim=-1)
    nmi = analysis.attention_nmi(attn, num_prefix=1).double().numpy()
    ent = analysis.attention_entropy(attn, num_prefix=1).double().numpy()
    a = attn[:, :, 1:, 1:].double().numpy()
    a = a / a.sum(-1, keepdims=True)
    p = n - 1
    want_nmi = np.zeros(h)
    want_ent = np.zeros(h)
    for bi in range(b):
        for hi in range(h):
            joint = a[bi, hi] / p  # p(q, k) = p(k|q) p(q)
            pq = joint.sum(1)
            pk = joint.sum(0)
            mi = sum(joint[i, j] * math.log(joint[i, j] / (pq[i] * pk[j])) for i in range(p) for j in range(p))
            hq = -sum(v * math.log(v) for v in pq)
            hk = -sum(v * math.log(v) for v in pk)
            want_nmi[hi] += mi / math.sqrt(hq * hk) / b
            want_ent[hi] += -(a[bi, hi] * np.log(a[bi, hi])).sum(1).mean() / b
    np.testing.assert_allclose(nmi, want_nmi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5)
    assert np.all((nmi > 0) & (nmi < 1))


def test_attention_distance_rejects_wrong_grid():
    with pytest.raises(ValueError, match="grid"):
        analysis.attention_distance(torch.ones(1, 1, 10, 10) / 10, (4, 4), 16, num_prefix=1)


def _orthonormal(rows, cols, gen, orthogonal_to_ones=False):
    m = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    if orthogonal_to_ones:
        m = m - m.mean(dim=0, keepdim=True)  # columns sum to 0: orthogonal to the all-ones vector
    q, _ = torch.linalg.qr(m)
    return q


def test_token_spectrum_known_singular_values():
    """Tokens built as U·diag(s)·Vᵀ with zero-mean columns of U: the centered spectrum is exactly log s − log s₁."""
    gen = torch.Generator().manual_seed(1)
    p, d = 10, 6
    spectra = [torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25]), torch.tensor([3.0, 3.0, 1.0, 1.0, 0.1, 0.1])]
    imgs = []
    for s in spectra:
        u = _orthonormal(p, d, gen, orthogonal_to_ones=True)
        v = _orthonormal(d, d, gen)
        patches = u @ torch.diag(s.double()) @ v.T  # [P, D]
        cls = torch.randn(1, d, generator=gen, dtype=torch.float64) * 100  # must be ignored
        imgs.append(torch.cat([cls, patches]))
    tokens = torch.stack(imgs).float()  # [2, 1 + P, D]
    got = analysis.singular_spectrum(tokens, level="token", num_prefix=1)
    want = torch.stack([torch.log(s) - torch.log(s[0]) for s in spectra]).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Uncentered: an offset shared by all tokens adds a direction; centering removes it.
    shifted = tokens.clone()
    shifted[:, 1:] += 50.0
    torch.testing.assert_close(analysis.singular_spectrum(shifted, "token", 1), want, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(analysis.singular_spectrum(shifted, "token", 1, center=False), want, atol=1e-2)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_image_spectrum_pooling(pooling):
    gen = torch.Generator().manual_seed(2)
    b, p, d = 12, 5, 4
    s = torch.tensor([5.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    emb = _orthonormal(b, d, gen, orthogonal_to_ones=True) @ torch.diag(s) @ _orthonormal(d, d, gen).T  # [B, D]
    noise = torch.randn(b, p, d, generator=gen, dtype=torch.float64)
    noise = noise - noise.mean(dim=1, keepdim=True)  # patch mean stays `emb`
    if pooling == "mean":
        tokens = torch.cat([torch.randn(b, 1, d, generator=gen, dtype=torch.float64), emb[:, None] + noise], 1)
    else:
        tokens = torch.cat([emb[:, None], noise * 10], 1)
    got = analysis.singular_spectrum(tokens.float(), level="image", num_prefix=1, pooling=pooling)
    torch.testing.assert_close(got, (torch.log(s) - math.log(5.0)).float(), rtol=1e-4, atol=1e-4)


def test_spectrum_rank_deficient_is_finite():
    tokens = torch.zeros(2, 5, 8)
    tokens[:, 1:, 0] = torch.arange(4.0)  # rank 1 after centering
    out = analysis.singular_spectrum(tokens, "token", 1)
    assert torch.isfinite(out).all() and out[0] == 0 and out[1:].min() >= analysis.LOG_SV_FLOOR


def test_attention_probs_scale():
    rel = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(analysis.attention_probs(rel, 16), torch.softmax(rel / 4.0, dim=-1))
