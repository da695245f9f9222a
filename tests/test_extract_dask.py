"""dask.distributed scale-out: a real LocalCluster with 2 worker processes writes the same store as
one process (one task per shard, each a whole-shard write)."""
from __future__ import annotations

import os
from dataclasses import replace

from stages.extract import extract
from pipeline.targets.store import TargetStore

from test_extract import assert_same_store, make_dataset, mim_cfg, save_checkpoint


def test_local_cluster_two_workers_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    manifest = make_dataset(tmp_path / "data", n=32, seed=5)  # 4 shards
    ckpt = save_checkpoint(tmp_path / "mim.pth", "vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8, "depth": 6},
                           seed=1)
    cfg = mim_cfg(manifest, tmp_path / "single", random_init=False, checkpoint=str(ckpt), views=2)
    single = extract(cfg)
    dask_url = extract(replace(cfg, targets=str(tmp_path / "dask"), workers=2, retries=1))
    assert_same_store(dask_url, single)
    store = TargetStore.open(dask_url)
    markers = [store.done_marker(k) for k in range(4)]
    assert os.getpid() not in {m["pid"] for m in markers}  # every shard ran in a worker process
    assert {m["worker"] for m in markers} <= {0, 1}  # LocalCluster names workers 0..N-1 (GPU i % count)


def test_q1pct_channel_basis_on_a_cluster_equals_one_process(tmp_path, monkeypatch):
    # The disc store's channel basis is fitted by shard 0's writer: the cluster runs shard 0 alone
    # first, then the rest, and stores exactly what one process stores (basis included).
    import numpy as np
    import zarr

    from test_extract import disc_cfg

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    manifest = make_dataset(tmp_path / "data", n=24, seed=6)  # 3 shards
    single_root, dask_root = tmp_path / "single", tmp_path / "dask"
    mim = extract(mim_cfg(manifest, single_root, views=1))
    single = extract(disc_cfg(manifest, single_root, precision="q1pct"))
    # retries=0: a shard written before the basis exists fails the run instead of being retried later.
    dask_url = extract(replace(disc_cfg(manifest, dask_root, precision="q1pct", mim_store=mim), workers=2, retries=0))
    assert_same_store(dask_url, single)
    a = zarr.open_group(single, mode="r")["features_channel_basis"]
    b = zarr.open_group(dask_url, mode="r")["features_channel_basis"]
    np.testing.assert_array_equal(a[...], b[...])
    store = TargetStore.open(dask_url)
    assert store.done_marker(0)["pid"] != os.getpid() and not store.bases.needed()
