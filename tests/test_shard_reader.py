"""Stage two's whole-shard reader (`pipeline.targets.shard_reader`) against Zarr's own reads.

Real stores from real extractions (tiny random-init ViTs, webdataset tars): every stored part of
every array a loader reads, in fp16, int8 and q1pct, with student pixels, read through the shard
reader and through Zarr, must be the same values; damaged bytes anywhere in a shard file (a chunk,
the shard index) are the same ShardDamagedError a Zarr read raises; codec chains it does not know
are left to Zarr.
"""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from numcodecs import Delta
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import ShardDamagedError
from pipeline.targets import schema, shard_reader
from pipeline.targets.store import TargetStore
from stages.extract import ExtractConfig, extract
from toydata import structured_jpeg, write_dataset

MIM = "timm:vit_tiny_patch16_224"
KW = {"img_size": 32, "patch_size": 8, "depth": 3}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    # a chunk per view for parts of >= 256 bytes per view (relations, pixels, q1pct codes) as for ViT-B
    # rows at the default, a row per chunk for the small ones: both layouts are read
    with pytest.MonkeyPatch.context() as m:
        m.setattr(schema, "VIEW_CHUNK_BYTES", 256)
        return _stores(tmp_path_factory)


def _stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-reader")
    rng = np.random.default_rng(0)
    manifest = write_dataset(root / "data", [structured_jpeg(rng, (40, 52)) for _ in range(10)], 4)
    out = {}
    for precision in ("fp16", "int8", "q1pct"):
        common = dict(manifest=manifest, random_init=True, model_kwargs=KW, batch_size=8, device="cpu",
                      progress=False, precision=precision)
        mim = extract(ExtractConfig(teacher=MIM, role="mim", out=str(root / f"mim-{precision}.zarr"), views=3,
                                    relation_layers=(2, 3), extra_targets=("attention",), **common))
        disc = extract(ExtractConfig(teacher=MIM, role="disc", out=str(root / f"disc-{precision}.zarr"),
                                     mim_store=mim, **common))
        out[precision] = (mim, disc)
    return out


def _both(store: TargetStore, k: int, names: list[str], views: np.ndarray, monkeypatch):
    fast = store.read_shard_views(k, names, views)
    with monkeypatch.context() as m:
        m.setattr(shard_reader, "plan", lambda arr: None)  # Zarr's own read path
        slow = store.read_shard_views(k, names, views)
    return fast, slow


@pytest.mark.parametrize("precision", ["fp16", "int8", "q1pct"])
def test_every_part_reads_as_zarr_reads_it(stores, precision, monkeypatch):
    for url in stores[precision]:
        store = TargetStore.open(url)
        names = [n for n, s in store.arrays.items() if s.per_view]
        for k in range(store.num_shards):
            count = store.shard_rows(k)[1]
            views = np.random.default_rng(k).integers(0, store.views, count)
            fast, slow = _both(store, k, names, views, monkeypatch)
            assert fast.keys() == slow.keys() == set(names)
            for name in names:
                assert fast[name].keys() == slow[name].keys()
                for part in fast[name]:
                    assert fast[name][part].dtype == slow[name][part].dtype
                    np.testing.assert_array_equal(fast[name][part], slow[name][part], err_msg=f"{name}/{part}")
    mim = TargetStore.open(stores[precision][0])
    assert "student_pixels" in mim.arrays and "relations" in mim.arrays
    # every part of the stores hdpipe writes takes the fast path, in both layouts
    layouts = set()
    for name, spec in mim.arrays.items():
        if spec.per_view:
            assert shard_reader.plan(mim._array(name)) is not None, name
            layouts.add(shard_reader.plan(mim._array(name)).chunk[1])
    assert layouts == {1, mim.views}


def _shard_file(url: str, part: str, k: int, ndim: int):
    import pathlib

    return pathlib.Path(url) / part / "c" / "/".join([str(k)] + ["0"] * (ndim - 1))


@pytest.mark.parametrize("where", ["chunk", "index"])
def test_a_flipped_byte_is_the_error_zarr_gives(stores, tmp_path, where, monkeypatch):
    import shutil

    url = str(tmp_path / "mim.zarr")
    shutil.copytree(stores["fp16"][0], url)
    store = TargetStore.open(url)
    path = _shard_file(url, "relations", 1, store._array("relations").ndim)
    data = bytearray(path.read_bytes())
    data[10 if where == "chunk" else len(data) - 10] ^= 0x40
    path.write_bytes(bytes(data))
    views = np.zeros(store.shard_rows(1)[1], dtype=np.int64)
    with pytest.raises(ShardDamagedError) as fast:
        TargetStore.open(url).read_shard_views(1, ["relations"], views)
    assert fast.value.shard == 1 and fast.value.array == "relations" and "crc32c" in fast.value.why
    with monkeypatch.context() as m:
        m.setattr(shard_reader, "plan", lambda arr: None)
        with pytest.raises(ShardDamagedError) as slow:
            TargetStore.open(url).read_shard_views(1, ["relations"], views)
    assert str(fast.value) == str(slow.value)
    # the other shards still read
    TargetStore.open(url).read_shard_views(0, ["relations"], np.zeros(store.shard_rows(0)[1], dtype=np.int64))


def test_a_delta_filter_chain_decodes_and_other_chains_are_left_to_zarr(tmp_path):
    """Stores written with a delta filter before Blosc (student pixels of early stores) decode here;
    a chain this reader does not know (no crc32c) gets no plan, so Zarr reads it."""
    data = np.random.default_rng(1).integers(0, 255, (6, 2, 5, 7), dtype=np.uint8)
    known = zarr.create_array(str(tmp_path / "g.zarr"), name="d", shape=data.shape, chunks=(1, 2, 5, 7),
                              shards=(3, 2, 5, 7), dtype="uint8", filters=[zarr.codecs.numcodecs.Delta(dtype="uint8")],
                              compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle", typesize=1),
                                           Crc32cCodec()])
    known[:] = data
    plan = shard_reader.plan(known)
    assert plan is not None and isinstance(plan.delta, Delta)

    class _Store:  # what read_views uses of a TargetStore
        url = str(tmp_path / "g.zarr")

    views = np.array([1, 0, 1])
    got = shard_reader.read_views(_Store(), "d", "d", plan, 1, 3, views)
    np.testing.assert_array_equal(got, data[3:6][np.arange(3), views])
    other = zarr.create_array(str(tmp_path / "o.zarr"), shape=data.shape, chunks=(1, 2, 5, 7), shards=(3, 2, 5, 7),
                              dtype="uint8", compressors=[BloscCodec(cname="zstd", clevel=3, typesize=1)])
    assert shard_reader.plan(other) is None


@pytest.mark.parametrize("precision", ["fp16", "q1pct"])
def test_open_views_keep_only_the_chosen_views_and_decode_into_place(stores, precision, monkeypatch):
    """`open_shard_views` keeps each row's chosen view still compressed (fewer bytes than the shard
    files hold at 3 views) and `decode_into` writes it into any row of a larger array, equal to
    Zarr's read of that view; fill chunks of rows extraction skipped read as the fill value."""
    import pathlib

    store = TargetStore.open(stores[precision][0])
    names = [n for n, s in store.arrays.items() if s.per_view]
    k, count = 0, store.shard_rows(0)[1]
    views = (np.arange(count) % store.views).astype(np.int64)
    lazy = store.open_shard_views(k, names, views)
    _, slow = _both(store, k, names, views, monkeypatch)
    for name in names:
        for part, rows in lazy[name].items():
            assert isinstance(rows, shard_reader.ShardViews) and len(rows) == count
            batch = np.full((count + 2,) + rows.row_shape, 7, dtype=rows.dtype)
            for r in reversed(range(count)):  # any order, into rows 1.. of a bigger batch
                rows.decode_into(r, batch[r + 1, ...])
            np.testing.assert_array_equal(batch[1:count + 1], slow[name][part], err_msg=f"{name}/{part}")
            assert (batch[0] == 7).all() and (batch[-1] == 7).all()
            np.testing.assert_array_equal(rows[count - 1], slow[name][part][count - 1])
    big = [(name, part) for name in names for part, rows in lazy[name].items() if rows.plan.chunk[1] == 1]
    assert big  # parts chunked per view keep one view of 3 per row
    for name, part in big:
        key = schema.part_name(name, part)
        on_disk = _shard_file(store.url, key, k, store._array(key).ndim)
        assert lazy[name][part].nbytes < 0.5 * pathlib.Path(on_disk).stat().st_size, (name, part)


def test_damage_in_any_view_stops_the_first_open_and_later_the_open_that_shows_it(stores, tmp_path):
    """A shard file's first open in a process checks every chunk's crc32c, before any row is used;
    later opens of the same file check (and read) only the chunks of the views they show, so bit rot
    in a view no row shows passes until an epoch shows it, and then stops that open."""
    import os
    import shutil

    url = str(tmp_path / "mim.zarr")
    shutil.copytree(stores["fp16"][0], url)
    store = TargetStore.open(url)
    part = "relations"
    arr = store._array(part)
    plan = shard_reader.plan(arr)
    assert plan.chunk[:2] == (1, 1)
    path = _shard_file(url, part, 0, arr.ndim)
    pristine = path.read_bytes()
    n = plan.shard[0] * plan.shard[1]
    index = np.frombuffer(pristine[len(pristine) - n * 16 - 4:len(pristine) - 4], "<u8").reshape(n, 2)
    off = int(index[store.views - 1][0])  # row 0, its last view (chunks in C order over rows, views)
    damaged = bytearray(pristine)
    damaged[off + 8] ^= 0x01
    count = store.shard_rows(0)[1]
    views = np.zeros(count, dtype=np.int64)

    def rot(data: bytes) -> None:  # the same file (inode, size, mtime) with other bytes: silent bit rot
        st = path.stat()
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    rot(bytes(damaged))
    with pytest.raises(ShardDamagedError, match="crc32c"):  # first open: every chunk, shown or not
        TargetStore.open(url).open_shard_views(0, [part], views)
    rot(pristine)
    TargetStore.open(url).open_shard_views(0, [part], views)  # now checked whole once
    rot(bytes(damaged))
    got = TargetStore.open(url).read_shard_views(0, [part], views)[part]["q"]  # view 0 only: not read
    assert got.shape[0] == count
    views[0] = store.views - 1
    with pytest.raises(ShardDamagedError, match="crc32c"):
        TargetStore.open(url).open_shard_views(0, [part], views)
    from pipeline.targets import integrity

    assert integrity.check_content(TargetStore.open(url), 0) is not None


def test_batch_rows_are_decoded_into_one_shared_buffer_in_a_worker(stores, monkeypatch):
    """In a loader worker a piece's stacked rows are views of one shared-memory buffer (the
    DataLoader sends it to the training process through one file descriptor, without a copy); in
    the main process plain memory; same values, and `pack`/`unpack` rebuild the same views."""
    import torch
    import torch.utils.data

    from pipeline.train import pieces
    from pipeline.train.target_rows import StoredRow, fill_rows, row_spec

    store = TargetStore.open(stores["fp16"][0])
    count = store.shard_rows(1)[1]
    rows = store.open_shard_views(1, ["relations"], np.ones(count, np.int64))["relations"]["q"]
    want = np.asarray(rows)[::-1]
    entries = {"rel": [StoredRow(rows, r) for r in reversed(range(count))], "index": [np.int64(5), np.int64(6)],
               "ids": [np.arange(3, dtype=np.int32), np.arange(3, 6, dtype=np.int32)]}

    def stacked():
        buf, out, _ = pieces.allocate({k: row_spec(v) for k, v in entries.items()})
        for k, v in entries.items():
            fill_rows(v, out[k].numpy())
        return buf, out

    buf, main = stacked()
    assert not buf.is_shared()
    np.testing.assert_array_equal(main["rel"].numpy(), want)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    buf, shared = stacked()
    assert buf.is_shared() and all(t.untyped_storage().data_ptr() == buf.data_ptr() for t in shared.values())
    np.testing.assert_array_equal(shared["rel"].numpy(), want)
    assert shared["index"].tolist() == [5, 6] and shared["ids"].dtype == torch.int32  # 0-d rows too
    packed = pieces.pack({**shared, "extra": torch.ones(2)}, buf)
    assert set(packed) == {"extra", pieces.BUFFER, pieces.LAYOUT, pieces.SLOT}  # one tensor for the stacked ones
    back = pieces.unpack(packed)
    assert set(back) == {"rel", "index", "ids", "extra"}
    for k in shared:
        assert back[k].dtype == shared[k].dtype and torch.equal(back[k], shared[k])
