"""Extraction's whole-shard writer (`pipeline.targets.shard_writer`) against Zarr's own writes.

Real extractions (tiny random-init ViTs, webdataset tars, a partial last shard, an unreadable image
stored as valid=false) write every store file byte for byte as Zarr writes it, in fp16, int8 and
q1pct, with student pixels; the codec variants hdpipe does not write itself (a delta filter, the
shard index first, an empty shard) are compared with Zarr arrays directly.
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.targets import schema, shard_reader, shard_writer
from pipeline.targets.store import TargetStore
from stages.extract import ExtractConfig, extract
from toydata import structured_jpeg, write_dataset

MIM = "timm:vit_tiny_patch16_224"
KW = {"img_size": 32, "patch_size": 8, "depth": 3}


def _files(url: str) -> dict[str, bytes]:
    """Every file of a store's arrays (not its done markers, which hold timings, nor the store's own
    attributes and config, which name its path)."""
    root = pathlib.Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and len(p.relative_to(root).parts) > 1 and p.relative_to(root).parts[0] != "done"}


@pytest.mark.parametrize("precision", ["fp16", "int8", "q1pct"])
def test_extraction_writes_the_files_zarr_writes(tmp_path, precision, monkeypatch):
    # these tiny rows are small: parts of >= 256 bytes per view (relations but q1pct's, pixels) take a
    # chunk per view, as ViT-B's do at the default, the rest (views, masks) a row per chunk
    monkeypatch.setattr(schema, "VIEW_CHUNK_BYTES", 256)
    rng = np.random.default_rng(0)
    images = [structured_jpeg(rng, (40, 52)) for _ in range(10)]
    images[5] = b"not a jpeg"  # a row of zeros (valid=false): chunks Zarr does not store
    manifest = write_dataset(tmp_path / "data", images, 4)  # shards of 4, 4, 2 rows

    def both(out: str, **kw) -> tuple[str, str]:
        common = dict(manifest=manifest, random_init=True, model_kwargs=KW, batch_size=8, device="cpu",
                      progress=False, precision=precision, on_error="skip", **kw)
        mine = extract(ExtractConfig(out=str(tmp_path / f"{out}.zarr"), **common))
        with monkeypatch.context() as m:
            m.setattr(shard_reader, "plan", lambda arr: None)  # shard_writer hands every part to Zarr
            theirs = extract(ExtractConfig(out=str(tmp_path / f"{out}-zarr.zarr"), **common))
        return mine, theirs

    mim, mim_zarr = both("mim", teacher=MIM, role="mim", views=3, relation_layers=(2, 3),
                         extra_targets=("attention",))
    disc, disc_zarr = both("disc", teacher=MIM, role="disc", mim_store=mim)
    for mine, theirs in ((mim, mim_zarr), (disc, disc_zarr)):
        a, b = _files(mine), _files(theirs)
        assert a.keys() == b.keys() and sum("/c/" in k for k in a) >= 6
        assert [k for k in a if a[k] != b[k]] == []
    store = TargetStore.open(mim)
    assert "student_pixels" in store.arrays and not store.read_shard(1, ["valid"])["valid"][1]
    # the writer wrote them: every per-view part has a plan, and the invalid row's chunk is not stored
    chunk_views = {}
    for name, spec in store.arrays.items():
        if spec.per_view:
            assert shard_reader.plan(store._array(name)) is not None, name
            chunk_views[name] = shard_reader.plan(store._array(name)).chunk[1]
    # large parts are chunked per view whatever their precision (q1pct codes included)
    assert chunk_views["relations"] == 1
    assert chunk_views["student_pixels"] == 1 and chunk_views["views"] == 3
    rel = store.read_shard(1, ["relations"])["relations"]
    assert not rel[1].any() and rel[0].any()


@pytest.mark.parametrize("index_location,chunk_views", [("end", 2), ("start", 2), ("end", 1)])
def test_encode_matches_zarr_for_delta_filters_index_first_and_empty_shards(tmp_path, index_location, chunk_views):
    data = np.random.default_rng(1).integers(0, 255, (7, 2, 5, 3), dtype=np.uint8)
    data[1] = 0  # a chunk of fill values: not stored
    data[4:6] = 0  # shard 1 (rows 3..5) keeps only row 3
    data[0, 1] = 0  # with a chunk per view: view 1 of row 0 is not stored
    arr = zarr.create_array(str(tmp_path / "g.zarr"), name="d", shape=data.shape, chunks=(1, chunk_views, 5, 3),
                            shards={"shape": (3, 2, 5, 3), "index_location": index_location}, dtype="uint8",
                            filters=[zarr.codecs.numcodecs.Delta(dtype="uint8")], fill_value=0,
                            compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle", typesize=1),
                                         Crc32cCodec()])
    arr[:] = data
    plan = shard_reader.plan(arr)
    assert plan is not None and plan.index_at_end == (index_location == "end") and plan.chunk[1] == chunk_views
    root = tmp_path / "g.zarr" / "d" / "c"

    class _Store:  # what read_views uses of a TargetStore
        url = str(tmp_path / "g.zarr")

    for k, rows in enumerate((data[0:3], data[3:6], data[6:7])):
        assert b"".join(shard_writer.encode(plan, rows)) == (root / str(k) / "0" / "0" / "0").read_bytes(), k
        views = np.arange(len(rows)) % 2
        got = shard_reader.read_views(_Store(), "d", "d", plan, k, len(rows), views)
        np.testing.assert_array_equal(got, rows[np.arange(len(rows)), views])
    assert shard_writer.encode(plan, np.zeros((3, 2, 5, 3), np.uint8)) is None
    with pytest.raises(ValueError, match="do not fit"):
        shard_writer.encode(plan, np.zeros((4, 2, 5, 3), np.uint8))


@pytest.mark.parametrize("precision,views,chunk_views", [("fp16", 2, 1), ("q1pct", 2, 1), ("q1pct", 3, 1)])
def test_chunks_per_view_rule(tmp_path, precision, views, chunk_views):
    """Parts of >= VIEW_CHUNK_BYTES per view are chunked per view, q1pct codes too (stage two shows
    one view a row per epoch and decompresses only it); small parts keep a row per chunk."""
    from pipeline.targets.schema import ArraySpec
    from test_store import _attrs, _manifest

    specs = {"relations": ArraySpec((2, 3, 40, 40), "float32", precision), "views": ArraySpec((5,), "float32"),
             "valid": ArraySpec((), "bool", per_view=False)}
    store = TargetStore.create(str(tmp_path / "s.zarr"), _attrs(precision), specs, _manifest(8, 4), views)
    assert store._array("relations").chunks[:2] == (1, chunk_views)
    assert store._array("views").chunks[:2] == (1, views)


@pytest.mark.parametrize("precision,cname", [("fp16", "lz4"), ("int8", "lz4"), ("q1pct", "zstd")])
def test_pixels_follow_their_stores_trade(tmp_path, precision, cname):
    """Student pixels are compressed as their store's targets: lz4 in decode-speed-first stores
    (fp16, int8), zstd level 1 in q1pct's bytes-first ones; the store's codec attribute says which."""
    from pipeline.targets.schema import PIXEL_CODECS, ArraySpec
    from test_store import _attrs, _manifest

    specs = {"student_pixels": ArraySpec((3, 3, 4, 4), "uint8", pixels=True), "views": ArraySpec((5,), "float32"),
             "valid": ArraySpec((), "bool", per_view=False)}
    store = TargetStore.create(str(tmp_path / "s.zarr"), _attrs(precision), specs, _manifest(8, 4), 2)
    blosc = store._array("student_pixels").metadata.codecs[0].codecs[1]
    assert blosc.cname.value == cname and blosc.shuffle.value == "noshuffle"
    assert blosc.clevel == (schema.COMPACT_ZSTD_LEVEL if cname == "zstd" else schema.LZ4_LEVEL)
    assert PIXEL_CODECS["fast" if cname == "lz4" else "compact"] in store.attrs["codec"]
    assert shard_reader.plan(store._array("student_pixels")).blosc[0] == cname.encode()
