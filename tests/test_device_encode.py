"""Extraction encodes q1pct and fp16 on the teacher's device (pipeline.targets.device_encode) into
the same bytes as the numpy encoder at write time.

A real tiny timm teacher extracts a MIM store (relations, attention, block features: tokens and rows
layouts) and a discriminative store (features in the channel basis: shard 0 fits it from float32
values on the host, later shards encode on the device) with an unreadable image skipped (rows no
batch fills). The same extraction with the torch encoder switched off (numpy at write time) must
give the very same file bytes for every stored part and basis; so must a CPU teacher's, which
encodes with numpy batch by batch (`device_encode.TORCH_ON_CPU` off).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import NonFiniteError, StoreError
from pipeline.targets import compact, compact_torch, device_encode, quant
from pipeline.targets.store import TargetStore
from stages.extract import extract
from test_extract import disc_cfg, make_dataset, mim_cfg


def _extract_both(manifest: str, root: Path, precision: str = "q1pct") -> None:
    common = dict(precision=precision, views=2, on_error="skip", batch_size=6)
    extract(mim_cfg(manifest, root, tokens="kept", extra_targets=("attention", "block_features"), **common))
    extract(disc_cfg(manifest, root, mim_store=str(root / "mim.zarr"),
                     **{k: v for k, v in common.items() if k != "views"}))


def _data_files(store: Path) -> dict[str, bytes]:
    """Every file of a store but the ones that carry times and paths (group attributes, done markers)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.relative_to(store).parts[0] != "done" and p != store / "zarr.json"
            and p.name != "extract-config.json"}


@pytest.mark.parametrize("precision", ["q1pct", "fp16"])
def test_device_encoded_store_has_the_numpy_encoders_bytes(tmp_path, monkeypatch, precision):
    manifest = make_dataset(tmp_path / "data", n=16, corrupt=(3,))
    monkeypatch.setattr(device_encode, "TORCH_ON_CPU", True)  # the GPU path, on this CPU
    calls = []
    codec = quant.CODECS[precision]
    encode = codec.encode_torch
    monkeypatch.setattr(codec, "encode_torch", lambda *a, **kw: calls.append(a[0].shape) or encode(*a, **kw))
    _extract_both(manifest, tmp_path / "device", precision)
    # relations, attention, block features: every batch of both shards; features: (q1pct) shard 1's batches only
    assert len(calls) > 6
    monkeypatch.setattr(codec, "encode_torch", None)  # the host path: numpy at write time
    calls.clear()
    _extract_both(manifest, tmp_path / "host", precision)
    assert calls == []
    for name in ("mim.zarr", "disc.zarr"):
        device, host = _data_files(tmp_path / "device" / name), _data_files(tmp_path / "host" / name)
        assert sorted(device) == sorted(host)
        assert any(k.startswith("relations") or k.startswith("features") for k in device)
        for key in device:
            assert device[key] == host[key], f"{name}/{key} differs"
    store = TargetStore.open(str(tmp_path / "device" / "disc.zarr"))
    marker = store.done_marker(1)
    assert 0 < marker["error"]["features"]["max_view"] <= 0.01 and marker["skipped"] == []
    assert [s["index"] for s in store.done_marker(0)["skipped"]] == [3]
    host_marker = TargetStore.open(str(tmp_path / "host" / "disc.zarr")).done_marker(1)
    assert np.isclose(marker["error"]["features"]["relative"], host_marker["error"]["features"]["relative"], rtol=1e-6)


def test_a_cpu_teacher_encodes_with_numpy_batch_by_batch(tmp_path, monkeypatch):
    manifest = make_dataset(tmp_path / "data", n=16, corrupt=(3,))
    calls = []
    monkeypatch.setattr(compact_torch, "encode", lambda *a, **kw: calls.append(1))
    _extract_both(manifest, tmp_path / "cpu")
    assert calls == []
    monkeypatch.setattr(quant.CODECS["q1pct"], "encode_torch", None)  # everything at write time
    _extract_both(manifest, tmp_path / "host")
    for name in ("mim.zarr", "disc.zarr"):
        assert _data_files(tmp_path / "cpu" / name) == _data_files(tmp_path / "host" / name)


def test_fp16_torch_encoder_rounds_as_numpy_and_refuses_what_numpy_refuses():
    import torch

    rng = np.random.default_rng(0)
    x = np.concatenate([np.clip(rng.standard_normal(4096), -5, 5) * 10.0 ** rng.uniform(-9, 4, 4096),  # 1e-9..5e4
                        (np.arange(-2048, 2048) + 0.5) * 2.0 ** -10,  # exact ties between fp16 neighbours
                        [0.0, -0.0, 65504.0, -65504.0, 2.0 ** -24, 2.0 ** -25]]).astype(np.float32).reshape(2, -1)
    codec = quant.CODECS["fp16"]
    on_torch = codec.encode_torch(torch.from_numpy(x), 1)["q"].numpy()
    assert on_torch.tobytes() == quant.encode(x, "fp16", 1)["q"].tobytes()
    for bad, error in ((np.float32([[1.0, 7e4]]), StoreError), (np.float32([[1.0, np.nan]]), NonFiniteError)):
        with pytest.raises(error):
            quant.encode(bad, "fp16", 1)
        with pytest.raises(error):
            codec.encode_torch(torch.from_numpy(bad), 1)


def test_parts_of_another_shape_are_refused(tmp_path):
    from test_compact_torch import _store_targets
    from test_store import N, T, V, _attrs, _manifest, _shard, _specs

    store = TargetStore.create(str(tmp_path / "t.zarr"), _attrs("q1pct"), _specs("q1pct"), _manifest(), V)
    arrays = _shard(_store_targets(N, V, T), store, 0)
    parts = quant.encode(arrays["relations"], "q1pct")
    bad = quant.Encoded({**parts, "q": parts["q"][:, :, :1]}, np.zeros((4, V)), np.zeros((4, V)))
    with pytest.raises(StoreError, match="'relations' arrives encoded as"):
        store.write_shard(0, {**arrays, "relations": bad})
    # shard 0 fits the channel basis from float32 values: features cannot arrive encoded there
    basis = compact.fit_channel_basis(arrays["features"])
    features = quant.Encoded(quant.encode(arrays["features"], "q1pct", channel_basis=basis), np.zeros((4, V)),
                             np.zeros((4, V)))
    with pytest.raises(StoreError, match="arrived encoded before its channel basis was fitted"):
        store.write_shard(0, {**arrays, "features": features})
