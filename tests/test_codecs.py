"""Store precisions as codecs: every codec in the registry (`pipeline.targets.quant.CODECS`) is
checked the same way, and a precision added through the extension point alone works end to end.

(a) For each registered codec: round trips within the bound it states (`element_bound` per element,
`view_bound` per view) on the data of tests/test_quant.py, parts exactly as `part_specs` says,
blockwise encoding equal to one row at a time, torch decoding equal to numpy's where offered, a
`verify` tolerance, and the `--precision` choices. (b) A toy `fp32` codec (float32 verbatim),
defined and registered here only (the registry monkeypatched, no other module touched): a real
store written, read, inspected; a real extraction with `--precision fp32` verified against the
teacher; the store refused by name once the codec is gone.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError, NonFiniteError, StoreError
from pipeline.targets import compact, quant
from pipeline.targets.precisions.base import Codec
from test_quant import CASES, _relations_like


class Fp32(Codec):
    """The toy precision: float32 stored verbatim (what a new precision module would hold)."""

    name = "fp32"
    summary = "float32 verbatim (exact)"
    verify_tolerance = 5e-3  # exact storage; the rest is float noise of the rerun
    view_bound = 0.0

    def part_specs(self, shape_tail, channel_basis=False):
        return {"q": (tuple(shape_tail), "float32")}

    def encode(self, x, view_axes, channel_basis=None):
        return {"q": np.array(x, np.float32)}

    def decode(self, parts, channel_basis=None):
        return np.asarray(parts["q"]).astype(np.float32)

    def element_bound(self, x, view_axes):
        return np.zeros(1)


@pytest.fixture
def fp32(monkeypatch):
    """Register the toy codec for one test: the extension point, and nothing else."""
    monkeypatch.setitem(quant.CODECS, "fp32", Fp32())
    return quant.CODECS["fp32"]


def _check_codec(c: Codec) -> None:
    """What every codec must do, whatever its parts (used for the registry and the toy alike)."""
    assert c.element_bound(np.ones((1, 1, 2)), 2) is not None or c.view_bound is not None, "states no bound"
    assert 0 < c.verify_tolerance < 0.1 and (c.view_bound is None or c.verify_tolerance >= c.view_bound)
    assert c.encode_block >= 1 and c.summary
    for case in sorted(CASES):
        x = CASES[case](np.random.default_rng(11))
        parts = quant.encode(x, c.name)
        assert {p: (a.shape[2:], a.dtype.name) for p, a in parts.items()} == quant.part_specs(x.shape[2:], c.name), case
        x_hat = quant.decode(parts, c.name)
        assert x_hat.dtype == np.float32 and x_hat.shape == x.shape
        assert c.within_bound(x, x_hat, 2), case
        stats = quant.error_stats(x, parts, c.name)
        if c.view_bound is not None:
            assert stats["max_view"] <= c.view_bound, case
    # Features in a channel basis (how extraction lays them out): codecs without one ignore it.
    f = _relations_like(np.random.default_rng(12), n=3, v=2, heads=1, t=20)[:, :, 0]  # [3, 2, 20, 20]
    basis = compact.fit_channel_basis(f)
    parts = quant.encode(f, c.name, channel_basis=basis)
    want = quant.part_specs(f.shape[2:], c.name, channel_basis=True)
    assert {p: (a.shape[2:], a.dtype.name) for p, a in parts.items()} == want
    assert c.within_bound(f, quant.decode(parts, c.name, basis), 2)
    bad = np.ones((1, 1, 3, 3), np.float32)
    bad[0, 0, 1, 1] = np.nan
    with pytest.raises(NonFiniteError):
        quant.encode(bad, c.name)


@pytest.mark.parametrize("name", sorted(quant.CODECS))
def test_every_codec_meets_its_stated_bound_and_part_specs(name):
    c = quant.CODECS[name]
    assert c.name == name
    _check_codec(c)


@pytest.mark.parametrize("name", sorted(quant.CODECS))
def test_blocks_encode_like_single_rows(name):
    c = quant.CODECS[name]
    x = _relations_like(np.random.default_rng(13), n=c.encode_block + 3, v=1, heads=1, t=6)
    whole = quant.encode(x, name)
    for i in (0, c.encode_block, c.encode_block + 2):
        one = quant.encode(x[i : i + 1], name)
        for p in whole:
            np.testing.assert_array_equal(whole[p][i : i + 1], one[p])


@pytest.mark.parametrize("name", sorted(quant.CODECS))
def test_torch_decode_equals_numpy_where_offered(name):
    import torch

    c = quant.CODECS[name]
    x = _relations_like(np.random.default_rng(14))
    parts = quant.encode(x, name)
    if c.decode_torch is None:
        assert name not in ("fp16", "int8"), "fp16 and int8 decode in torch (issue 19)"
        return
    got = c.decode_torch({p: torch.from_numpy(a) for p, a in parts.items()})
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), quant.decode(parts, name))


def test_choices_come_from_the_registry(fp32):
    """`--precision` lists the registry; the config refuses other names with the registered ones."""
    import click

    from pipeline.commands.common import config_options
    from pipeline.config import resolve
    from stages.extract import ExtractConfig

    @click.command()
    @config_options(ExtractConfig)
    def cmd(**flags):
        pass

    option = next(p for p in cmd.params if p.name == "precision")
    assert list(option.type.choices) == list(quant.CODECS) == ["fp16", "int8", "q1pct", "fp32"]
    assert resolve(ExtractConfig, {"precision": "fp32"}).precision == "fp32"
    with pytest.raises(ConfigError, match=r"unknown precision 'bf8'; choose one of \['fp16', 'int8', 'q1pct', 'fp32'"):
        resolve(ExtractConfig, {"precision": "bf8"})
    with pytest.raises(StoreError, match="unknown precision 'bf8'"):
        quant.codec("bf8")


# --- (b) the toy precision, end to end ----------------------------------------------------------


def test_toy_codec_round_trips_like_the_others(fp32):
    _check_codec(fp32)
    x = CASES["heavy_tail"](np.random.default_rng(15))
    np.testing.assert_array_equal(quant.decode(quant.encode(x, "fp32"), "fp32"), x)


def test_toy_codec_store_written_read_and_inspected(tmp_path, fp32, capsys):
    from pipeline.cli import main as cli_main
    from pipeline.targets.schema import ArraySpec
    from pipeline.targets.store import TargetStore
    from stages.inspect_store import format_info, inspect_store
    from test_store import _attrs, _manifest, _shard

    rng = np.random.default_rng(16)
    N, V, T = 10, 2, 9
    arrays = {
        "relations": _relations_like(rng, n=N, v=V, heads=3, t=T)[:, :, None],  # [N, V, 1, 3, T, T]
        "features": rng.normal(size=(N, V, T, 24)).astype(np.float32),
        "views": rng.random((N, V, 5)).astype(np.float32),
        "valid": np.ones(N, bool),
    }
    specs = {"relations": ArraySpec((1, 3, T, T), "float32", "fp32"),
             "features": ArraySpec((T, 24), "float32", "fp32", channel_basis=True),
             "views": ArraySpec((5,), "float32"), "valid": ArraySpec((), "bool", per_view=False)}
    url = str(tmp_path / "t.zarr")
    store = TargetStore.create(url, _attrs("fp32"), specs, _manifest(), V)
    for k in range(store.num_shards):
        marker = store.write_shard(k, _shard(arrays, store, k), {})
        assert marker["error"]["relations"]["relative"] == 0.0
    again = TargetStore.open(url, expect={"precision": "fp32"})
    for k in range(again.num_shards):
        got, want = again.read_shard(k), _shard(arrays, again, k)
        for name in arrays:
            np.testing.assert_array_equal(got[name], want[name])
    info = inspect_store(url, content=True)
    assert info["precision"] == "fp32" and info["damaged"]["shards"] == {}
    assert info["arrays"]["relations"]["stored_parts"] == {"q": "float32"}
    assert "fp32: float32 verbatim (exact)" in format_info(info)
    assert cli_main(["inspect", url]) == 0 and "fp32" in capsys.readouterr().out
    # Once the codec is gone (an hdpipe without it), the store is refused by name, not misread.
    quant.CODECS.pop("fp32")
    with pytest.raises(StoreError, match=r"unknown precision 'fp32'; choose one of \['fp16', 'int8', 'q1pct'\]"):
        TargetStore.open(url)


def test_toy_codec_extracted_and_verified(tmp_path, fp32):
    """`--precision fp32` through the real config, extraction and `hdpipe verify` (tiny random teacher)."""
    from pipeline.config import resolve
    from pipeline.targets.store import TargetStore
    from stages.extract import ExtractConfig, extract
    from stages.verify import VerifyConfig, format_report, verify
    from toydata import structured_jpeg, write_dataset

    rng = np.random.default_rng(17)
    manifest = write_dataset(tmp_path / "data", [structured_jpeg(rng) for _ in range(6)], 4)
    cfg = resolve(ExtractConfig, {
        "manifest": manifest, "teacher": "timm:vit_tiny_patch16_224", "role": "mim", "random_init": True,
        "model_kwargs": {"img_size": 64, "patch_size": 8, "depth": 4}, "views": 1, "targets": str(tmp_path / "t"),
        "name": "mim", "batch_size": 8, "device": "cpu", "progress": False, "precision": "fp32"})
    url = extract(cfg)
    store = TargetStore.open(url)
    assert store.precision == "fp32" and store.done_shards() == {0, 1}
    assert store.done_marker(0)["error"]["relations"]["max_view"] == 0.0
    report = verify(VerifyConfig(store=url, samples=4, device="cpu"))
    assert report["ok"] and report["tolerance"] == Fp32.verify_tolerance, report
    assert report["arrays"]["relations"]["rel"] < 1e-4  # exact storage: only the rerun's float noise
    assert "precision fp32" in format_report(report)
