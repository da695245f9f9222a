"""q1pct in torch (pipeline.targets.compact_torch) against the numpy codec (pipeline.targets.compact).

What must hold: for the same float32 input, the torch encoder's parts are the numpy encoder's, byte
for byte, in every layout (tokens, channels, rows) and on awkward views (all zero, constant,
outliers, tiny and subnormal values, views whose first step misses the 1% bound, odd sizes), for a
whole batch at once as for numpy's blocks of rows; and torch decode gives numpy decode's float32
values bit for bit. Both follow from performing the same IEEE operations in the same order
(`exact.tree_sum`), which the helpers' own cases check. Stores of the previous encoder version are
read, never extended.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import NonFiniteError, StoreError
from pipeline.targets import compact, compact_torch, exact, quant
from test_compact import _features, _tokens


def _awkward(x: np.ndarray) -> np.ndarray:
    """x [N >= 5, V, ...] with its first views made awkward: zero, constant, an outlier, tiny, subnormal."""
    x = x.copy()
    x[0, 0] = 0.0
    x[1, 0] = 3.25
    x[2, 0].reshape(-1)[7] = 1e4 * float(np.abs(x[2, 0]).max())
    x[3, 0] *= np.float32(1e-30)
    x[4, 0] *= np.float32(1e-41)  # float32 subnormals
    return x


def _missing_first_step() -> np.ndarray:
    """One view [1, 1, 4] = [1, 1, 1, v] whose first step puts the three ones half a step off the grid
    (~1.5% error): the encoder must shrink the step."""
    k = 28.5  # the ones land at 28.5 steps
    rms = 1.0 / (2.0 * np.sqrt(3.0) * compact.DESIGN * k)
    v = np.sqrt(4.0 * rms**2 - 3.0)
    return np.array([[[1.0, 1.0, 1.0, v]]], np.float32)


def _relations(rng, t):
    return _tokens(rng, n=6, v=2, layers=2, heads=3, t=t)


CASES = {
    # name: (x, view_axes, channel basis or None)
    "tokens-T37": lambda rng: (_awkward(_relations(rng, 37)), 2, None),
    "tokens-T68-rank32": lambda rng: (_relations(rng, 68), 2, None),
    "tokens-T3": lambda rng: (_relations(rng, 3), 2, None),
    "channels": lambda rng: (_awkward(_features(rng, n=6, t=21, d=48)), 2, "fit"),
    "channels-D20-k20": lambda rng: (_features(rng, n=5, t=7, d=20), 2, "fit"),
    "rows-2d": lambda rng: (_awkward(rng.normal(size=(6, 2, 5, 33)).astype(np.float32)), 2, None),
    "rows-1d": lambda rng: (_awkward(rng.standard_t(2, size=(6, 3, 19)).astype(np.float32)), 2, None),
    "one-view-axis": lambda rng: (_relations(rng, 11)[:, 0], 1, None),
    "first-step-misses": lambda rng: (_missing_first_step(), 2, None),
}


def _encode_both(x, view_axes, basis):
    if basis == "fit":
        basis = compact.fit_channel_basis(x)
    want = quant.encode(x, "q1pct", view_axes=view_axes, channel_basis=basis)  # numpy, in blocks of rows
    got = compact_torch.encode(torch.from_numpy(x), view_axes, None if basis is None else torch.from_numpy(basis))
    return want, got, basis


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_encoder_writes_the_numpy_encoders_bytes(case):
    x, view_axes, basis = CASES[case](np.random.default_rng(20))
    want, got, _ = _encode_both(x, view_axes, basis)
    assert sorted(got) == sorted(want)
    for part in want:
        assert got[part].device.type == "cpu"
        g = got[part].numpy()
        assert g.dtype == want[part].dtype and g.shape == want[part].shape, part
        assert g.tobytes() == want[part].tobytes(), f"{case}: part {part!r} differs"
    x_hat = quant.decode(want, "q1pct", None if basis is None else compact.fit_channel_basis(x))
    assert (quant.per_view_relative_error(x, x_hat, view_axes) <= compact.BOUND).all()


def test_a_view_that_misses_its_first_step_is_shrunk_the_same_way():
    x = _missing_first_step()
    want, got, _ = _encode_both(x, 2, None)
    first = np.float32(2.0 * np.sqrt(3.0) * compact.DESIGN * np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    assert want["step"][0, 0] < first  # the bound loop ran
    assert got["step"].numpy().tobytes() == want["step"].tobytes()


@pytest.mark.parametrize("case", ["tokens-T37", "channels", "rows-2d", "one-view-axis"])
def test_torch_decode_gives_numpys_float32_values(case):
    x, view_axes, basis = CASES[case](np.random.default_rng(21))
    want, _, basis = _encode_both(x, view_axes, basis)
    tb = None if basis is None else torch.from_numpy(basis)
    got = quant.codec("q1pct").decode_torch({p: torch.from_numpy(a) for p, a in want.items()}, channel_basis=tb)
    assert got.dtype == torch.float32
    assert got.numpy().tobytes() == quant.decode(want, "q1pct", basis).tobytes()
    # any leading selection of views decodes alone, as in the loader (one view per row)
    one = {p: torch.from_numpy(a[:, 1] if view_axes == 2 else a[2:4]) for p, a in want.items()}
    np.testing.assert_array_equal(compact_torch.decode(one, tb).numpy(),
                                  quant.decode(want, "q1pct", basis)[:, 1] if view_axes == 2
                                  else quant.decode(want, "q1pct", basis)[2:4])


@pytest.mark.parametrize("shape,axis", [((5, 1), -1), ((3, 67), -1), ((4, 68, 5), -2), ((2, 3, 128), 2),
                                        ((6, 0), -1), ((1000,), 0)])
def test_tree_sum_is_one_order_in_numpy_and_torch(shape, axis):
    a = np.random.default_rng(22).normal(size=shape) * 10.0 ** np.random.default_rng(23).integers(-8, 8, size=shape)
    want = exact.tree_sum(a, axis)
    got = compact_torch.tree_sum(torch.from_numpy(a), axis).numpy()
    assert got.tobytes() == want.tobytes()
    np.testing.assert_allclose(want, a.sum(axis=axis), rtol=1e-9, atol=1e-6 * np.abs(a).max(initial=0))


def test_tree_sum_order_is_the_documented_one():
    a = np.array([1e16, 1.0, -1e16, 1.0, 3.0])  # h = 4: [1e16 + 3, 1, -1e16, 1], then halves
    assert exact.tree_sum(a) == ((1e16 + 3.0) + -1e16) + (1.0 + 1.0)


@pytest.mark.parametrize("scale", [2**10, 2**28])  # float64 products, then the split halves
def test_torch_imatmul_and_round_shift_are_exact(scale):
    rng = np.random.default_rng(24)
    a, b = rng.integers(-scale, scale, size=(3, 5, 7)), rng.integers(-scale, scale, size=(7, 4))
    got = compact_torch.imatmul(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(got, exact.imatmul(a, b))
    x = np.arange(-9, 10) * 3
    np.testing.assert_array_equal(compact_torch.round_shift(torch.from_numpy(x), 2).numpy(), exact.round_shift(x, 2))
    with pytest.raises(StoreError, match="exceeds int64"):
        compact_torch.imatmul(torch.full((1, 4), 2**40), torch.full((4, 1), 2**40))


def test_torch_encoder_refuses_what_numpy_refuses():
    bad = np.ones((1, 1, 3, 3), np.float32)
    bad[0, 0, 1, 1] = np.nan
    with pytest.raises(NonFiniteError):
        compact_torch.encode(torch.from_numpy(bad), 2)
    x = _features(np.random.default_rng(25))
    with pytest.raises(StoreError, match="channel basis has shape"):
        compact_torch.encode(torch.from_numpy(x), 2, torch.zeros((47, 8), dtype=torch.int16))
    with pytest.raises(StoreError, match="float32"):
        compact_torch.encode(torch.from_numpy(x).double(), 2)


def _store_targets(n, v, t):
    """Synthetic targets of test_store's layout: relations [n, v, 2, 3, t, t], features [n, v, t, 192]."""
    rng = np.random.default_rng(26)
    return {"relations": _tokens(rng, n=n, v=v, layers=2, heads=3, t=t),
            "features": _features(rng, n=n, v=v, t=t, d=192),
            "views": rng.random((n, v, 5)).astype(np.float32),
            "keep_progressive": np.sort(rng.integers(0, 64, size=(n, v, t - 1)), axis=-1).astype(np.int16),
            "valid": np.ones(n, bool)}


def test_stores_of_the_previous_encoder_are_read_but_not_extended(tmp_path):
    from test_store import N, T, V, _make, _shard

    from pipeline.targets.store import TargetStore

    url = str(tmp_path / "t.zarr")
    targets = _store_targets(N, V, T)
    _make(url, targets, "q1pct", shards=(0,))
    g = zarr.open_group(url, mode="r+")
    g.attrs["hdpipe"] = {**dict(g.attrs["hdpipe"]), "q1pct_codec": 2}  # its parts are version 3's
    store = TargetStore.open(url)
    np.testing.assert_array_equal(store.read_shard(0, names=["relations"])["relations"],
                                  quant.decode(quant.encode(_shard(targets, store, 0)["relations"], "q1pct"), "q1pct"))
    with pytest.raises(StoreError, match="encoder version 2; this hdpipe .* encodes version 3"):
        store.write_shard(1, _shard(targets, store, 1))
