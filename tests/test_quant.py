"""Storage precisions (pipeline.targets.quant): round trips with their stated bounds, edge cases, refusals.

Bounds checked here (x float32, x_hat = decode(encode(x))):
- fp16: x_hat == float32(float16(x)) exactly;
- int8: per element |x_hat - x| <= scale / 2 with scale >= absmax / 127 of its row, and the
  float16 scale exceeds absmax / 127 by at most one float16 ulp (rounded up, never down);
- q1pct: every view's ||x_hat - x||_2 / ||x||_2 <= 1%, and x_hat is plain uniform rounding
  rint(x / step) * step (the means and subspaces are only predictors for the entropy coder;
  tests/test_compact.py checks the predictors and their exactness).
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.targets import compact, quant
from pipeline.errors import NonFiniteError, StoreError


def _relations_like(rng, n=3, v=2, heads=3, t=17):
    """Pre-softmax logits q_i.k_j: a shared key mean gives every row its own offset."""
    q = rng.normal(size=(n, v, heads, t, 8))
    k = rng.normal(size=(n, v, heads, t, 8)) + 1.5
    return np.einsum("nvhid,nvhjd->nvhij", q, k).astype(np.float32)


CASES = {
    "gaussian": lambda rng: rng.normal(size=(4, 2, 9, 33)).astype(np.float32),
    "relations": _relations_like,
    "heavy_tail": lambda rng: (rng.standard_t(2, size=(3, 2, 20, 16)) * 50).astype(np.float32),
    "offset_channels": lambda rng: (rng.normal(size=(3, 1, 12, 40)) + rng.normal(size=40) * 20).astype(np.float32),
    "tiny_values": lambda rng: (rng.normal(size=(2, 2, 5, 7)) * 1e-6).astype(np.float32),
    "one_axis_body": lambda rng: rng.normal(size=(5, 3, 24)).astype(np.float32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp16_is_exact_to_fp16(case):
    x = CASES[case](np.random.default_rng(0))
    parts = quant.encode(x, "fp16")
    assert set(parts) == {"q"} and parts["q"].dtype == np.float16
    np.testing.assert_array_equal(quant.decode(parts, "fp16"), x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("case", sorted(CASES))
def test_int8_within_half_a_step_of_its_row_scale(case):
    x = CASES[case](np.random.default_rng(1))
    parts = quant.encode(x, "int8")
    assert parts["q"].dtype == np.int8 and parts["scale"].dtype == np.float16
    assert parts["scale"].shape == x.shape[:-1]
    assert np.abs(parts["q"].astype(int)).max() <= 127
    absmax = np.abs(x.astype(np.float64)).max(axis=-1)
    scale = parts["scale"].astype(np.float64)
    assert (scale * 127 >= absmax).all(), "scale rounded down: values would clip"
    # Rounded up by at most one float16 ulp: relative 2**-10 for normal scales, 2**-24 absolute for
    # subnormal ones (rows with absmax < 127 * 2**-14 ~ 0.0078 lose scale precision, not the bound).
    assert (scale <= absmax / 127 + np.maximum(absmax / 127 * 2**-10, 2**-24) * 1.0001).all()
    x_hat = quant.decode(parts, "int8")
    assert x_hat.dtype == np.float32
    assert (np.abs(x_hat.astype(np.float64) - x) <= scale[..., None] / 2 * (1 + 1e-6) + 1e-12).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_q1pct_every_view_within_one_percent(case):
    x = CASES[case](np.random.default_rng(2))
    parts = quant.encode(x, "q1pct")
    x_hat = quant.decode(parts, "q1pct")
    assert x_hat.shape == x.shape and x_hat.dtype == np.float32
    for i in np.ndindex(x.shape[:2]):
        err = np.linalg.norm(x_hat[i].astype(np.float64) - x[i]) / np.linalg.norm(x[i].astype(np.float64))
        assert err <= 0.01, (i, err)
    want = quant.part_specs(x.shape[2:], "q1pct")
    assert {p: (a.shape[2:], a.dtype.name) for p, a in parts.items()} == want


@pytest.mark.parametrize("case", sorted(CASES))
def test_q1pct_is_uniform_rounding_on_its_step(case):
    x = CASES[case](np.random.default_rng(7))
    parts = quant.encode(x, "q1pct")
    step = parts["step"].reshape(x.shape[:2] + (1,) * (x.ndim - 2))  # float32 [n, V, 1, ...]
    want = np.rint(x.astype(np.float64) / step.astype(np.float64)).astype(np.float32) * step
    np.testing.assert_array_equal(quant.decode(parts, "q1pct"), want)


def test_q1pct_spends_its_error_budget():
    # The step is sized for ~0.99% error: a much smaller error would mean bytes were wasted.
    x = _relations_like(np.random.default_rng(3), n=4, v=2, heads=4, t=40)
    err = quant.per_view_relative_error(x, quant.decode(quant.encode(x, "q1pct"), "q1pct"), 2)
    assert (err > 0.008).all() and (err <= 0.01).all()


def test_q1pct_row_means_carry_the_offsets():
    # Rows that differ only by a constant offset: means remove them, codes are near zero.
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(1, 1, 30, 50)) * 0.01 + rng.normal(size=(1, 1, 30, 1)) * 100).astype(np.float32)
    parts = quant.encode(x, "q1pct")
    step = float(parts["step"][0, 0])
    rowmean = compact.unzigzag(parts["rowmean"]) * step  # integer means, in units of the step
    assert np.abs(rowmean - x.mean(-1)).max() <= step  # rounded mean of rounded values
    # The residual's spread is 1e-4 of the view's rms: after the means, everything rounds to 0 or +-1.
    assert compact.unzigzag(parts["q"]).max() <= 1


@pytest.mark.parametrize("precision", quant.PRECISIONS)
def test_zero_and_constant_views(precision):
    x = np.zeros((2, 2, 4, 6), np.float32)
    x[1, 0] = 3.25  # constant view
    x[1, 1, 2] = -7.0  # one non-zero row among zero rows
    x_hat = quant.decode(quant.encode(x, precision), precision)
    np.testing.assert_array_equal(x_hat[0], 0.0)  # zero rows: scale/step 0 must not make NaN
    np.testing.assert_array_equal(x_hat[1, 1, [0, 1, 3]], 0.0)
    # fp16 holds 3.25 and -7 exactly; int8 is within scale/2 of each row; q1pct within 1% per view
    # (a constant view is the worst case of its grid: every element carries the same rounding).
    tol = {"fp16": 0.0, "int8": 1 / 127 / 2 * 1.001, "q1pct": 0.01}[precision]
    np.testing.assert_allclose(x_hat[1, 0], 3.25, rtol=0, atol=3.25 * tol)
    np.testing.assert_allclose(x_hat[1, 1, 2], -7.0, rtol=0, atol=7.0 * tol)


@pytest.mark.parametrize("precision", quant.PRECISIONS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(precision, bad):
    x = np.ones((1, 1, 3, 3), np.float32)
    x[0, 0, 1, 2] = bad
    with pytest.raises(NonFiniteError, match="non-finite"):
        quant.encode(x, precision)


def test_beyond_fp16_range_refused_by_fp16():
    x = np.full((1, 1, 2, 2), 1e6, np.float32)
    with pytest.raises(StoreError, match="float16"):
        quant.encode(x, "fp16")


def test_int8_and_q1pct_handle_values_beyond_fp16():
    # int8 keeps only its scales in float16 (1e6 / 127 fits); q1pct has a float32 step and integers.
    x = np.array([[[[1e6, -5e5, 0.0], [3.0, 2e5, 7e5]]]], np.float32)
    x_hat = quant.decode(quant.encode(x, "int8"), "int8")
    assert np.abs(x_hat - x).max() <= 1e6 / 127 / 2 * 1.01
    x_hat = quant.decode(quant.encode(x, "q1pct"), "q1pct")
    assert quant.relative_error(x, x_hat) <= 0.01


def test_unknown_precision():
    with pytest.raises(StoreError, match="unknown precision 'bf8'"):
        quant.encode(np.zeros((1, 1, 2), np.float32), "bf8")


def test_relative_error_definition():
    assert quant.relative_error(np.array([3.0, 4.0]), np.array([3.0, 4.5])) == pytest.approx(0.1)
    assert quant.relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert quant.relative_error(np.zeros(3), np.ones(3)) == np.inf
    got = quant.per_view_relative_error(np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[3.0, 4.5], [1.0, 0.2]]), 1)
    np.testing.assert_allclose(got, [0.1, 0.2])


def test_zigzag_round_trip_extremes():
    q = np.array([0, -1, 1, -2, 2, 32767, -32767, -32768])
    z = compact.zigzag(q)
    np.testing.assert_array_equal(z[:5], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(compact.unzigzag(z), q)


def test_large_first_axis_is_encoded_in_blocks_identically():
    # Shards bigger than the encode block must give the same parts as one view at a time.
    x = _relations_like(np.random.default_rng(5), n=quant._BLOCK + 7, v=1, heads=1, t=6)
    whole = quant.encode(x, "q1pct")
    for i in (0, quant._BLOCK, quant._BLOCK + 6):
        one = quant.encode(x[i : i + 1], "q1pct")
        for p in whole:
            np.testing.assert_array_equal(whole[p][i : i + 1], one[p])


@pytest.mark.parametrize("precision", quant.PRECISIONS)
def test_error_stats_blockwise_equals_direct(precision):
    x = _relations_like(np.random.default_rng(6), n=quant._BLOCK + 5, v=2, heads=2, t=9)
    parts = quant.encode(x, precision)
    got = quant.error_stats(x, parts, precision)
    x_hat = quant.decode(parts, precision)
    assert got["relative"] == pytest.approx(quant.relative_error(x, x_hat), rel=1e-9)
    assert got["max_view"] == pytest.approx(quant.per_view_relative_error(x, x_hat, 2).max(), rel=1e-9)
    assert got["ref_l2"] == pytest.approx(np.linalg.norm(x.astype(np.float64)), rel=1e-9)


def test_finite_check_is_exact_behind_its_fast_path():
    import torch

    from pipeline.errors import require_finite

    # Sums that overflow to Inf while every value is finite are not an error (the fast path falls back).
    require_finite(np.full(4, 3e38, np.float32), "big")
    require_finite(torch.full((4,), 3e38), "big")
    require_finite(np.arange(7), "ints")  # integers are always finite
    for values in (np.array([1.0, np.nan, np.inf]), torch.tensor([[np.inf, -np.inf], [0.0, 1.0]])):
        with pytest.raises(NonFiniteError, match="holds 2 non-finite value"):
            require_finite(values, "x")
