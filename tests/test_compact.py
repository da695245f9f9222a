"""The q1pct codec (pipeline.targets.compact) and its exact integer algebra (pipeline.targets.exact).

What must hold: decode(encode(x)) is exactly uniform rounding rint(x / step) * step (the predictors
are lossless on the codes), the predictors really remove structure (smaller residual codes), and
every stored number is the same bits for the same input whatever BLAS does (products of integers
are exact; Gram-Schmidt avoids BLAS). Independent references: Python integers, numpy's eigh.
"""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from pipeline.errors import StoreError
from pipeline.targets import compact, exact, quant


def _tokens(rng, n=2, v=2, layers=2, heads=3, t=40, d=24, rank=6):
    """Relations of one set of tokens: R_h = X Wq_h (X Wk_h)ᵀ with X [t, d] of low token rank."""
    x = rng.normal(size=(n, v, t, rank)) @ rng.normal(size=(rank, d)) + 0.1 * rng.normal(size=(n, v, t, d))
    wq, wk = rng.normal(size=(2, layers, heads, d, 8))
    q = np.einsum("nvtd,lhde->nvlhte", x, wq)
    k = np.einsum("nvtd,lhde->nvlhte", x, wk) + 1.0
    return np.einsum("nvlhie,nvlhje->nvlhij", q, k).astype(np.float32)


def _features(rng, n=4, v=2, t=20, d=48, rank=5):
    """Token features whose channels are strongly correlated (a few directions carry most energy)."""
    mix = rng.normal(size=(rank, d)) * np.linspace(3, 1, rank)[:, None]
    x = rng.normal(size=(n, v, t, rank)) @ mix + 0.05 * rng.normal(size=(n, v, t, d)) + rng.normal(size=d)
    return x.astype(np.float32)


# --- exact integer algebra --------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2**10, 2**28])  # the float64 path, then the int64 fallback
def test_imatmul_equals_python_integers(scale):
    rng = np.random.default_rng(0)
    a = rng.integers(-scale, scale, size=(3, 5, 7))
    b = rng.integers(-scale, scale, size=(7, 4))
    want = np.array([[[sum(int(a[i, r, k]) * int(b[k, c]) for k in range(7)) for c in range(4)] for r in range(5)]
                     for i in range(3)], dtype=object)
    got = exact.imatmul(a, b)
    assert got.dtype == np.int64 and (got.astype(object) == want).all()


def test_imatmul_refuses_what_int64_cannot_hold():
    with pytest.raises(StoreError, match="exceeds int64"):
        exact.imatmul(np.full((1, 4), 2**40), np.full((4, 1), 2**40))


def test_round_shift_rounds_half_up():
    x = np.arange(-9, 10)
    want = [int(np.floor(v / 4 + 0.5)) for v in x]
    np.testing.assert_array_equal(exact.round_shift(x, 2), want)
    np.testing.assert_array_equal(exact.round_shift(x, 0), x)


def test_orthonormal_columns_and_dependent_ones():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(10, 4))
    y[:, 2] = y[:, 0] - 2 * y[:, 1]  # dependent on the first two
    q = exact.orthonormal_columns(y, fill=True)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-12)  # still four orthonormal directions
    z = exact.orthonormal_columns(np.stack([y, y]), fill=False)  # batched: the dependent column is zero
    np.testing.assert_array_equal(z[:, :, 2], 0.0)
    np.testing.assert_allclose(z[0][:, [0, 1, 3]].T @ z[0][:, [0, 1, 3]], np.eye(3), atol=1e-12)


def test_leading_basis_finds_the_top_eigenvectors():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 200)) * (100 * 0.6 ** np.arange(30))[:, None]  # eigenvalue gaps of ~2.8x
    gram = np.rint(a @ a.T).astype(np.int64)
    basis = exact.leading_basis(gram, 3, iterations=30)
    w, v = np.linalg.eigh(gram.astype(np.float64))
    for j in range(3):  # the same directions as LAPACK's, up to sign
        assert abs(basis[:, j] @ v[:, -1 - j]) > 0.999


# --- the codec --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,basis", [(_tokens, False), (_features, True)])
def test_decode_is_uniform_rounding_and_parts_match_their_specs(make, basis):
    x = make(np.random.default_rng(3))
    b = compact.fit_channel_basis(x) if basis else None
    parts = quant.encode(x, "q1pct", channel_basis=b)
    assert {p: (a.shape[2:], a.dtype.name) for p, a in parts.items()} == \
        quant.part_specs(x.shape[2:], "q1pct", channel_basis=basis)
    step = parts["step"].reshape(x.shape[:2] + (1,) * (x.ndim - 2))
    want = np.rint(x.astype(np.float64) / step.astype(np.float64)).astype(np.float32) * step
    np.testing.assert_array_equal(quant.decode(parts, "q1pct", b), want)
    assert (quant.per_view_relative_error(x, want, 2) <= 0.01).all()


def test_token_subspace_removes_the_shared_token_structure():
    x = _tokens(np.random.default_rng(4), t=48)
    parts = quant.encode(x, "q1pct")
    assert parts["token_basis"].shape[-1] == compact.RANK  # T = 48 > RANK: a real reduction
    resid = compact.unzigzag(parts["q"]).astype(np.float64)
    pred = compact._predict(compact.unzigzag(parts["token_basis"]), compact.unzigzag(parts["coef"]), resid.shape)
    before = resid + pred  # the codes after the row and column means only
    assert np.sqrt(np.mean(resid**2)) < 0.25 * np.sqrt(np.mean(before**2))


def test_channel_basis_removes_correlated_channels():
    x = _features(np.random.default_rng(5))
    b = compact.fit_channel_basis(x)
    with_basis = compact.unzigzag(quant.encode(x, "q1pct", channel_basis=b)["q"]).astype(np.float64)
    without = compact.unzigzag(quant.encode(x, "q1pct")["q"]).astype(np.float64)
    assert np.sqrt(np.mean(with_basis**2)) < 0.2 * np.sqrt(np.mean(without**2))


def test_channel_basis_is_orthonormal_and_leads_with_the_top_direction():
    x = _features(np.random.default_rng(6), n=8)
    b = compact.fit_channel_basis(x).astype(np.float64) / 2**compact.CHANNEL_BITS
    assert b.shape == (48, min(compact.CHANNELS, 48))
    np.testing.assert_allclose(b.T @ b, np.eye(b.shape[1]), atol=3e-3)  # fixed point: 2**-14 per entry
    rows = x.reshape(-1, 48).astype(np.float64)
    top = np.linalg.eigh(rows.T @ rows)[1][:, -1]
    assert abs(b[:, 0] @ top) > 0.999


def test_same_bytes_whatever_blas_does():
    # Float BLAS changes its last bits with the thread count; nothing stored may depend on it.
    x, f = _tokens(np.random.default_rng(7), t=48), _features(np.random.default_rng(8))
    runs = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            b = compact.fit_channel_basis(f)
            runs.append([quant.encode(x, "q1pct"), {"basis": b}, quant.encode(f, "q1pct", channel_basis=b)])
    for first, second in zip(*runs):
        assert sorted(first) == sorted(second)
        for k in first:
            assert first[k].tobytes() == second[k].tobytes(), k


def test_a_wrong_basis_is_refused():
    x = _features(np.random.default_rng(9))
    with pytest.raises(StoreError, match="channel basis has shape"):
        quant.encode(x, "q1pct", channel_basis=np.zeros((47, 8), np.int16))
