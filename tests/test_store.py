"""TargetStore on real Zarr v3 (local disk, file://, memory://) with targets of a real tiny ViT.

Targets come from a random-init timm ViT (64 px, patch 8, 3 heads, 192-d) on scikit-image photos:
raw Q·Kᵀ of two blocks and final-norm features, so value ranges are those of a transformer, not of
a random number generator. Error bounds per precision: fp16 exact to float16; int8 within half
its row scale per element; q1pct within 1% relative error per view.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

from pipeline.targets import quant
from pipeline.cli import main as cli_main
from pipeline.errors import NonFiniteError, StoreError
from pipeline.data.manifest import Manifest, ShardInfo
from pipeline.targets.schema import REQUIRED_ATTRS, SCHEMA_VERSION, ArraySpec
from pipeline.targets.store import TargetStore
from stages.inspect_store import bytes_per_view, format_info, inspect_store

N, S, V, T = 10, 4, 2, 17  # samples, shard size (shards 4 + 4 + 2), views, tokens (CLS + 16 kept)


def _manifest(total=N, size=S) -> Manifest:
    shards = tuple(
        ShardInfo(url=f"sample-{k:06d}.tar", count=min(size, total - k * size), first_index=k * size,
                  sha256=f"{k:064x}")
        for k in range((total + size - 1) // size)
    )
    return Manifest(name="sample", shard_size=size, total=total, shards=shards, class_map=None)


@pytest.fixture(scope="module")
def targets():
    """{relations [N, V, 2, 3, T, T], features [N, V, T, 192], views, keep_progressive, valid}."""
    import timm
    import torch
    from PIL import Image
    from skimage import data as skd

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=6).eval()
    photos = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket(), skd.immunohistochemistry()]
    rng = np.random.default_rng(0)
    images = []
    for i in range(N * V):  # a different random crop of a photo for every (sample, view)
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        crop = Image.fromarray(p[y : y + h // 2, x : x + w // 2]).resize((64, 64), Image.BICUBIC)
        images.append(np.asarray(crop, np.float32) / 255.0)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    rel = {}

    def hook(block):
        def f(mod, inp, out):
            B, L, C = inp[0].shape
            qkv = mod.qkv(inp[0]).reshape(B, L, 3, mod.num_heads, C // mod.num_heads).permute(2, 0, 3, 1, 4)
            rel[block] = qkv[0] @ qkv[1].transpose(-1, -2)  # raw Q·Kᵀ [B, H, L, L]

        return f

    for b in (4, 5):
        model.blocks[b - 1].attn.register_forward_hook(hook(b))
    with torch.inference_mode():
        feats = model.forward_features(x)  # [B, 65, 192] after the final norm
    keep = np.sort(np.stack([rng.choice(64, T - 1, replace=False) for _ in range(N * V)]), axis=1)
    tok = np.concatenate([np.zeros((N * V, 1), int), keep + 1], axis=1)  # [B, T]: CLS + kept
    R = torch.stack([rel[4], rel[5]], 1).numpy()  # [B, 2, 3, 65, 65]
    R = np.stack([R[i][:, :, tok[i]][:, :, :, tok[i]] for i in range(N * V)])
    Fk = np.stack([feats.numpy()[i, tok[i]] for i in range(N * V)])
    return {
        "relations": R.reshape(N, V, 2, 3, T, T).astype(np.float32),
        "features": Fk.reshape(N, V, T, 192).astype(np.float32),
        "views": rng.random((N, V, 5)).astype(np.float32),
        "keep_progressive": keep.reshape(N, V, T - 1).astype(np.int16),
        "valid": np.array([True] * (N - 1) + [False]),
    }


def _attrs(precision="fp16", **over):
    a = {"teacher": "timm:vit_tiny_patch16_224", "weights_digest": "d" * 64, "role": "mim",
         "preprocessing": {"size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
         "precision": precision, "tokens": "kept", "view_plan_digest": "v" * 64, "relation_layers": [4, 5]}
    a.update(over)
    return a


def _specs(precision="fp16"):
    return {
        "relations": ArraySpec((2, 3, T, T), "float32", precision),
        "features": ArraySpec((T, 192), "float32", precision, channel_basis=True),  # as extraction lays it out
        "views": ArraySpec((5,), "float32"),
        "keep_progressive": ArraySpec((T - 1,), "int16"),
        "valid": ArraySpec((), "bool", per_view=False),
    }


def _shard(arrays, store, k):
    first, count = store.shard_rows(k)
    return {n: a[first : first + count] for n, a in arrays.items()}


def _make(url, targets, precision="fp16", shards=(0, 1, 2), **kw):
    store = TargetStore.create(url, _attrs(precision), _specs(precision), _manifest(), V, **kw)
    for k in shards:
        store.write_shard(k, _shard(targets, store, k), {"seconds": 0.5, "images": store.shard_rows(k)[1]})
    return store


def _check_bound(precision, x, x_hat, stored_parts=None):
    """The precision's stated bound, computed independently of pipeline.targets.quant."""
    x64, d = x.astype(np.float64), x_hat.astype(np.float64) - x
    if precision == "fp16":
        np.testing.assert_array_equal(x_hat, x.astype(np.float16).astype(np.float32))
    elif precision == "int8":
        half = np.abs(x64).max(axis=-1, keepdims=True) / 127 / 2 * (1 + 2**-9)
        assert (np.abs(d) <= half + 1e-12).all()
    else:
        for i in np.ndindex(x.shape[:2]):
            assert np.linalg.norm(d[i]) <= 0.01 * np.linalg.norm(x64[i]), i


@pytest.mark.parametrize("precision", quant.PRECISIONS)
def test_round_trip_per_precision(tmp_path, targets, precision):
    store = _make(str(tmp_path / "t.zarr"), targets, precision)
    assert store.done_shards() == {0, 1, 2} and store.missing_shards() == []
    again = TargetStore.open(str(tmp_path / "t.zarr"), expect={"precision": precision, "tokens": "kept"})
    for k in range(3):
        got = again.read_shard(k)
        want = _shard(targets, again, k)
        assert set(got) == set(want)
        for name in ("views", "keep_progressive", "valid"):
            assert got[name].dtype == want[name].dtype
            np.testing.assert_array_equal(got[name], want[name])
        marker = again.done_marker(k)
        for name in ("relations", "features"):
            assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
            _check_bound(precision, want[name], got[name])
            # The error the marker records is the one a reader really gets.
            x, d = want[name].astype(np.float64), got[name].astype(np.float64) - want[name]
            assert marker["error"][name]["relative"] == pytest.approx(np.linalg.norm(d) / np.linalg.norm(x), rel=1e-6)
        assert marker["rows"] == again.shard_rows(k)[1] and marker["views_per_sample"] == V and marker["seconds"] == 0.5
        assert marker["images"] == marker["rows"]  # the caller's summary is kept
        assert marker["bytes"] == sum(marker["stored_bytes"].values()) > 0
    # Spot reads across shards, any order, equal the whole-shard reads.
    idx = [9, 0, 5, 4]
    rows = again.read_rows(idx, names=["relations", "views"])
    full = {k: again.read_shard(k, names=["relations", "views"]) for k in range(3)}
    for j, i in enumerate(idx):
        for name in ("relations", "views"):
            np.testing.assert_array_equal(rows[name][j], full[i // S][name][i % S])


def test_zarr_layout_chunks_shards_and_attributes(tmp_path, targets):
    url = str(tmp_path / "t.zarr")
    _make(url, targets, "int8")
    g = zarr.open_group(url, mode="r")
    rel, scale, valid = g["relations"], g["relations_scale"], g["valid"]
    assert rel.shape == (N, V, 2, 3, T, T) and rel.dtype == np.int8
    assert rel.chunks == (1, V, 2, 3, T, T) and rel.shards == (S, V, 2, 3, T, T)
    assert scale.shape == (N, V, 2, 3, T) and scale.dtype == np.float16 and scale.shards == (S, V, 2, 3, T)
    assert valid.shape == (N,) and valid.shards == (S,) and valid.chunks == (S,)
    # int8 codes: lz4 (decoded every epoch on the host), exact arrays: zstd
    assert '"cname": "lz4"' in json.dumps(rel.metadata.to_dict()["codecs"])
    assert '"cname": "zstd"' in json.dumps(valid.metadata.to_dict()["codecs"])
    # One file per Zarr shard = one per tar shard.
    assert sorted(os.listdir(tmp_path / "t.zarr" / "relations" / "c")) == ["0", "1", "2"]
    attrs = g.attrs["hdpipe"]
    assert attrs["schema_version"] == SCHEMA_VERSION and attrs["manifest_digest"] == _manifest().digest()
    assert attrs["total"] == N and attrs["shard_size"] == S and attrs["num_shards"] == 3 and attrs["views"] == V
    assert attrs["arrays"]["relations"] == {"shape_tail": [2, 3, T, T], "dtype": "float32", "precision": "int8",
                                            "per_view": True}
    assert sorted(os.listdir(tmp_path / "t.zarr" / "done")) == ["000000.json", "000001.json", "000002.json"]


def test_unfinished_shards_are_refused_and_named(tmp_path, targets):
    url = str(tmp_path / "t.zarr")
    store = _make(url, targets, "fp16", shards=(0,))
    # Data of shard 2 written but its marker never made (a crash between the two): still unfinished.
    g = zarr.open_group(url, mode="r+")
    g["views"][8:10] = targets["views"][8:10]
    assert store.done_shards() == {0} and store.missing_shards() == [1, 2]
    with pytest.raises(StoreError, match=r"shard 2 .* not finished"):
        store.read_shard(2)
    with pytest.raises(StoreError, match=r"shard 1 .* not finished"):
        store.read_rows([0, 5])
    with pytest.raises(StoreError, match=r"2 of 3 shards not finished \(1, 2\); run `hdpipe extract --teacher mae`"):
        store.require_complete("hdpipe extract --teacher mae")
    store.read_rows([0, 3])  # rows of the finished shard are fine
    empty = store.read_rows([], names=["relations", "valid"])
    assert empty["relations"].shape == (0, V, 2, 3, T, T) and empty["relations"].dtype == np.float32
    assert empty["valid"].shape == (0,) and empty["valid"].dtype == np.bool_


def test_failed_rewrite_leaves_no_marker(tmp_path, targets, monkeypatch):
    url = str(tmp_path / "t.zarr")
    store = _make(url, targets, "fp16", shards=(0, 1))
    real = store._array

    def failing(name):
        if name == "views":
            raise OSError("disk full")
        return real(name)

    monkeypatch.setattr(store, "_array", failing)
    with pytest.raises(OSError, match="disk full"):
        store.write_shard(1, _shard(targets, store, 1), {})
    assert store.done_shards() == {0}  # shard 1 is no longer trusted: its data may be half new


def test_open_expect_names_every_differing_field(tmp_path, targets):
    url = str(tmp_path / "t.zarr")
    _make(url, targets, "fp16", shards=())
    with pytest.raises(StoreError) as e:
        TargetStore.open(url, expect={"teacher": "clip", "tokens": "kept", "view_plan_digest": "x",
                                      "preprocessing": {**_attrs()["preprocessing"], "mean": [0.5, 0.5, 0.5]},
                                      "mask": {"ratio": 0.3}})
    msg = str(e.value)
    assert "teacher: stored 'timm:vit_tiny_patch16_224', expected 'clip'" in msg
    assert f"view_plan_digest: stored '{'v' * 64}', expected 'x'" in msg
    assert "preprocessing.mean: stored [0.485, 0.456, 0.406], expected [0.5, 0.5, 0.5]" in msg
    assert "mask: missing in store" in msg
    assert "tokens:" not in msg  # an equal field is not listed
    TargetStore.open(url, expect={"teacher": "timm:vit_tiny_patch16_224", "relation_layers": (4, 5)})  # tuples == lists


def test_schema_version_and_non_stores_refused(tmp_path, targets):
    url = str(tmp_path / "t.zarr")
    _make(url, targets, "fp16", shards=(0,))
    g = zarr.open_group(url, mode="r+")
    g.attrs["hdpipe"] = {**g.attrs["hdpipe"], "schema_version": 99}
    with pytest.raises(StoreError, match="schema_version 99"):
        TargetStore.open(url)
    with pytest.raises(StoreError, match="no target store at"):
        TargetStore.open(str(tmp_path / "missing.zarr"))
    # Parts in another encoding than this hdpipe's (e.g. an older q1pct) are refused, not misread.
    g.attrs["hdpipe"] = {**g.attrs["hdpipe"], "schema_version": SCHEMA_VERSION}
    del g["views"]
    g.create_array("views", shape=(N, V, 5), chunks=(1, V, 5), dtype="float16")
    with pytest.raises(StoreError, match="'views' is stored as float16, this hdpipe expects float32"):
        TargetStore.open(url).read_rows([0], names=["views"])
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not an hdpipe target store"):
        TargetStore.open(str(tmp_path / "plain.zarr"))


def test_channel_basis_is_fitted_on_shard_0_once(tmp_path, targets):
    from pipeline.targets import compact
    from pipeline.targets.bases import digest

    url = str(tmp_path / "t.zarr")
    store = _make(url, targets, "q1pct", shards=())
    assert store.bases.needed()
    with pytest.raises(StoreError, match="shard 1 cannot be written before shard 0"):
        store.write_shard(1, _shard(targets, store, 1))
    assert store.missing_shards() == [0, 1, 2] and TargetStore.open(url).bases.needed()
    for k in (0, 1, 2):
        store.write_shard(k, _shard(targets, store, k))
    reopened = TargetStore.open(url)
    basis = reopened.bases.get("features")
    # The basis is shard 0's, whoever writes the later shards, and every marker names it.
    np.testing.assert_array_equal(basis, compact.fit_channel_basis(_shard(targets, store, 0)["features"]))
    assert {reopened.done_marker(k)["channel_basis_digest"]["features"] for k in (0, 1, 2)} == {digest(basis)}
    assert not reopened.bases.needed() and reopened.bases.get("relations") is None
    _check_bound("q1pct", targets["features"], reopened.read_rows(range(N), names=["features"])["features"])
    # A damaged basis would decode every view wrongly: it is refused by its digest.
    arr = zarr.open_group(url, mode="r+")["features_channel_basis"]
    arr[0, 0] = arr[0, 0] + 1
    with pytest.raises(StoreError, match="channel basis of 'features' does not match its recorded digest"):
        TargetStore.open(url).read_shard(0, names=["features"])


def test_q1pct_parts_of_an_older_codec_are_refused(tmp_path, targets):
    url = str(tmp_path / "t.zarr")
    _make(url, targets, "q1pct", shards=(0,))
    g = zarr.open_group(url, mode="r+")
    attrs = dict(g.attrs["hdpipe"])
    del attrs["q1pct_codec"]  # what a store written before codec version 2 holds
    g.attrs["hdpipe"] = attrs
    with pytest.raises(StoreError, match="q1pct codes of codec version 1; this hdpipe .* reads version 2"):
        TargetStore.open(url)


def test_create_resumes_same_settings_refuses_others_overwrite_rebuilds(tmp_path, targets):
    url = str(tmp_path / "t.zarr")
    _make(url, targets, "fp16", shards=(0, 2))
    resumed = TargetStore.create(url, _attrs("fp16"), _specs("fp16"), _manifest(), V)
    assert resumed.done_shards() == {0, 2} and resumed.missing_shards() == [1]
    with pytest.raises(StoreError, match=r"precision: stored 'fp16', expected 'int8'.*--overwrite"):
        TargetStore.create(url, _attrs("int8"), _specs("int8"), _manifest(), V)
    with pytest.raises(StoreError, match="manifest_digest"):
        TargetStore.create(url, _attrs("fp16"), _specs("fp16"), _manifest(total=12), V)
    with pytest.raises(StoreError, match="views: stored 2, expected 3"):
        TargetStore.create(url, _attrs("fp16"), _specs("fp16"), _manifest(), 3)
    assert TargetStore.open(url).done_shards() == {0, 2}  # refusals touched nothing
    rebuilt = TargetStore.create(url, _attrs("int8"), _specs("int8"), _manifest(), V, overwrite=True)
    assert rebuilt.done_shards() == set() and rebuilt.attrs["precision"] == "int8"
    assert TargetStore.open(url).arrays["relations"].precision == "int8"
    rebuilt.write_shard(1, _shard(targets, rebuilt, 1), {})
    same = TargetStore.create(url, _attrs("int8"), _specs("int8"), _manifest(), V, overwrite=True)
    assert same.done_shards() == {1}  # overwrite rebuilds only other settings: the same ones resume


def test_write_shard_validation(tmp_path, targets):
    store = _make(str(tmp_path / "t.zarr"), targets, "q1pct", shards=())
    good = _shard(targets, store, 0)
    cases = [
        ({k: v for k, v in good.items() if k != "features"}, StoreError, r"missing \['features'\]"),
        ({**good, "extra": good["views"]}, StoreError, r"unknown \['extra'\]"),
        ({**good, "relations": good["relations"][:3]}, StoreError, r"'relations' has shape \(3, 2"),
        ({**good, "keep_progressive": good["keep_progressive"].astype(np.int64) + 40000}, StoreError, "do not fit"),
        ({**good, "features": good["features"].astype(np.int32)}, StoreError, "floating point"),
    ]
    bad = good["features"].copy()
    bad[1, 0, 3, 7] = np.nan
    cases.append(({**good, "features": bad}, NonFiniteError, r"shard 0: array 'features' holds 1 non-finite"))
    for arrays, err, pattern in cases:
        with pytest.raises(err, match=pattern):
            store.write_shard(0, arrays, {})
    assert store.done_shards() == set()
    with pytest.raises(StoreError, match="out of range"):
        store.write_shard(3, good, {})
    # int64 keep indices that fit int16 are accepted and stored as int16
    store.write_shard(0, {**good, "keep_progressive": good["keep_progressive"].astype(np.int64)}, {})
    assert store.read_shard(0, ["keep_progressive"])["keep_progressive"].dtype == np.int16


def test_create_validation(tmp_path):
    url = str(tmp_path / "t.zarr")
    for key in REQUIRED_ATTRS:
        a = _attrs()
        del a[key]
        with pytest.raises(StoreError, match=f"lack required key.*'{key}'"):
            TargetStore.create(url, a, _specs(), _manifest(), V)
    with pytest.raises(StoreError, match="unknown precision 'fp8'"):
        TargetStore.create(url, _attrs("fp8"), _specs("fp16"), _manifest(), V)
    with pytest.raises(StoreError, match="'relations' has precision 'int8' but the store's precision is 'fp16'"):
        TargetStore.create(url, _attrs("fp16"), {**_specs(), "relations": ArraySpec((2, 3, T, T), "float32", "int8")},
                           _manifest(), V)
    with pytest.raises(StoreError, match="set by the store"):
        TargetStore.create(url, _attrs(total=5), _specs(), _manifest(), V)
    with pytest.raises(StoreError, match="collide"):
        TargetStore.create(url, _attrs("int8"), {**_specs("int8"), "relations_scale": ArraySpec((1,))}, _manifest(), V)
    m = _manifest()
    misaligned = Manifest(name="x", shard_size=4, total=10, class_map=None,
                          shards=(m.shards[0], ShardInfo("b", 3, 4, "0" * 64), ShardInfo("c", 3, 7, "1" * 64)))
    with pytest.raises(StoreError, match=r"manifest shard 1 covers \[4, 7\) but a store needs \[4, 8\)"):
        TargetStore.create(url, _attrs(), _specs(), misaligned, V)
    assert not os.path.exists(url)  # nothing was made by a refused create


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    with pytest.raises(StoreError, match=r"cannot create target store at .*file.txt/t.zarr.*writable"):
        TargetStore.create(str(blocker / "t.zarr"), _attrs(), _specs(), _manifest(), V)
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    with pytest.raises(StoreError,
                       match=r"not an hdpipe target store \(or its creation was interrupted\); pass --overwrite"):
        TargetStore.create(str(other), _attrs(), _specs(), _manifest(), V)
    assert (other / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, targets, scheme):
    url = f"memory://stores-{os.getpid()}/t.zarr" if scheme == "memory" else f"file://{tmp_path}/t.zarr"
    store = _make(url, targets, "q1pct", shards=(0, 1), overwrite=True)
    again = TargetStore.open(url)
    assert again.done_shards() == {0, 1} and again.missing_shards() == [2]
    got = again.read_shard(1)
    _check_bound("q1pct", _shard(targets, store, 1)["relations"], got["relations"])
    assert bytes_per_view(again)["total"] > 0
    assert inspect_store(url)["shards"] == {"total": 3, "done": 2, "missing": [2]}
    if scheme == "file":
        assert (tmp_path / "t.zarr" / "done" / "000001.json").is_file()


def test_bytes_per_view_is_what_is_on_disk(tmp_path, targets):
    root = tmp_path / "t.zarr"
    store = _make(str(root), targets, "q1pct")
    on_disk, once = {}, {}
    for name in os.listdir(root):
        chunk_dir = root / name / "c"
        if chunk_dir.is_dir():
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(chunk_dir) for f in fs)
            if name == "features_channel_basis":  # kept once per store, reported apart
                once[name] = size + os.path.getsize(root / name / "zarr.json")
                continue
            logical = next(n for n in store.arrays if name == n or name.startswith(n + "_"))
            on_disk[logical] = on_disk.get(logical, 0) + size
    assert inspect_store(str(root))["store_level_bytes"] == once and once["features_channel_basis"] > 0
    bpv = bytes_per_view(store)
    for name, b in on_disk.items():
        assert bpv[name] * N * V == pytest.approx(b)
    assert bpv["total"] == pytest.approx(sum(on_disk.values()) / (N * V))
    # The compact mode is smaller than fp16 on transformer targets.
    fp16 = bytes_per_view(_make(str(tmp_path / "f.zarr"), targets, "fp16"))
    assert bpv["relations"] < fp16["relations"] and bpv["features"] < fp16["features"]


def test_inspect_on_a_real_store(tmp_path, targets, capsys):
    url = str(tmp_path / "t.zarr")
    store = _make(url, targets, "int8", shards=(0, 2))
    info = inspect_store(url)
    assert info["teacher"] == "timm:vit_tiny_patch16_224" and info["precision"] == "int8"
    assert info["samples"] == N and info["views"] == V and info["rows_done"] == 6
    assert info["shards"] == {"total": 3, "done": 2, "missing": [1]}
    assert info["bytes_per_view"] == pytest.approx(bytes_per_view(store)["total"])
    rel = info["arrays"]["relations"]
    # Shard-combined error from the markers equals the error over the finished rows, recomputed.
    rows = [0, 1, 2, 3, 8, 9]
    got = store.read_rows(rows, ["relations"])["relations"].astype(np.float64)
    want = targets["relations"][rows].astype(np.float64)
    assert rel["relative_error"] == pytest.approx(np.linalg.norm(got - want) / np.linalg.norm(want), rel=1e-6)
    assert 0 < rel["relative_error"] <= rel["max_view_relative_error"] < 0.02
    assert info["provenance"]["manifest_digest"] == _manifest().digest()
    text = format_info(info)
    for needle in ("timm:vit_tiny_patch16_224 (role mim)", "2 of 3 done", "missing: 1", "relations", "int8",
                   "bytes per view", "manifest_digest", _manifest().digest(), "relation_layers"):
        assert needle in text, needle
    assert cli_main(["inspect", url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shards"]["missing"] == [1] and out["arrays"]["features"]["precision"] == "int8"
    assert cli_main(["inspect", url]) == 0
    assert "2 of 3 done" in capsys.readouterr().out
    assert cli_main(["inspect", str(tmp_path / "nothing.zarr")]) == 2
    assert "no target store at" in capsys.readouterr().err


def test_inspect_stores_made_by_extract(tmp_path):
    """`hdpipe inspect` on stores written by the real extract stage (tiny random-init teachers)."""
    import io

    from PIL import Image
    from skimage import data as skd

    from pipeline.data.manifest import write_manifest
    from pipeline.data.tars import SampleRecord, write_dataset
    from stages.extract import ExtractConfig, extract

    photo = skd.astronaut()
    recs = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(photo[40 * i : 40 * i + 200, 30 * i : 30 * i + 240]).save(buf, format="PNG")
        recs.append(SampleRecord(name=f"a{i}.png", data=buf.getvalue(), ext="png", label=None, source="astronaut"))
    shards, _, _ = write_dataset(recs, name="toy", out_dir=str(tmp_path / "tars"), shard_size=4, progress=False)
    manifest = Manifest(name="toy", shard_size=4, total=6, class_map=None,
                        shards=tuple(ShardInfo(u, c, f, h) for u, c, f, h in shards))
    mpath = tmp_path / "tars" / "toy.json"
    write_manifest(manifest, mpath)
    common = dict(manifest=str(mpath), random_init=True, targets=str(tmp_path / "targets"), views=2,
                  precision="q1pct", batch_size=8, device="cpu", progress=False)
    mim = extract(ExtractConfig(teacher="timm:vit_tiny_patch16_224", role="mim", name="mim",
                                model_kwargs={"img_size": 64, "patch_size": 8, "depth": 6}, **common))
    disc = extract(ExtractConfig(teacher="timm:deit_tiny_patch16_224", role="disc", name="disc", mim_store=mim,
                                 model_kwargs={"img_size": 64, "patch_size": 8, "depth": 2}, **common))
    a, b = inspect_store(mim), inspect_store(disc)
    for info, arr in ((a, "relations"), (b, "features")):
        assert info["shards"] == {"total": 2, "done": 2, "missing": []} and info["samples"] == 6 and info["views"] == 2
        assert info["precision"] == "q1pct" and info["provenance"]["manifest_digest"] == manifest.digest()
        assert 0.005 < info["arrays"][arr]["relative_error"] <= info["arrays"][arr]["max_view_relative_error"] <= 0.01
        assert info["bytes_per_view"] > info["arrays"][arr]["bytes_per_view"] > 0
    assert b["provenance"]["view_plan_digest"] == a["provenance"]["view_plan_digest"]
    assert a["provenance"]["weights_digest"] != b["provenance"]["weights_digest"]
    text = format_info(a)
    assert "timm:vit_tiny_patch16_224 (role mim)" in text and "2 of 2 done" in text and "relations" in text
