"""Issue 20 at a small size: `benchmarks/bench_scale.py` scaled down (every stage, the killed and
resumed extraction and distillation, DVC), and what its full-size preview found growing faster than
the sample count, each fixed and checked here: `read_rows` splits its rows by shard in one pass (it
compared every row with every shard), the damage check stats each file of a local store (it walked
every nested chunk folder through fsspec), an extraction task parses the manifest once per process
(once per shard: quadratic in shards), `shard --urls` keeps 4 bytes of label per sample (a Python
int was 36), and the k-NN votes without a [N_train, C] one-hot (4 KB a train image at 1000 classes).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.manifest import Manifest, ShardInfo, write_manifest
from pipeline.targets import integrity
from pipeline.targets.schema import ArraySpec
from pipeline.targets.store import TargetStore

ROOT = Path(__file__).resolve().parents[1]
N, S = 203, 4  # 51 shards, the last one of 3 rows


def _manifest(total=N, size=S) -> Manifest:
    shards = tuple(ShardInfo(url=f"x-{k:06d}.tar", count=min(size, total - k * size), first_index=k * size,
                             sha256=f"{k:064x}") for k in range(-(-total // size)))
    return Manifest(name="x", shard_size=size, total=total, shards=shards, class_map=None)


@pytest.fixture()
def store(tmp_path) -> TargetStore:
    """Many small shards of two lossless arrays: `views` [N, 1, 5] = the row's index, `valid` [N]."""
    attrs = {"teacher": "toy", "weights_digest": "d" * 64, "role": "mim", "precision": "fp16", "tokens": "kept",
             "view_plan_digest": "v" * 64, "preprocessing": {"size": 16}}
    specs = {"views": ArraySpec((5,), "float32"), "valid": ArraySpec((), "bool", per_view=False)}
    st = TargetStore.create(str(tmp_path / "s.zarr"), attrs, specs, _manifest(), 1)
    for k in range(st.num_shards):
        first, count = st.shard_rows(k)
        rows = np.arange(first, first + count, dtype=np.float32)
        st.write_shard(k, {"views": np.repeat(rows[:, None, None], 5, axis=2), "valid": rows % 7 != 0})
    return st


def test_read_rows_reads_a_run_at_once_and_other_rows_once_per_shard(store, monkeypatch):
    import zarr

    calls = []
    real = zarr.Array.get_orthogonal_selection
    monkeypatch.setattr(zarr.Array, "get_orthogonal_selection",
                        lambda self, sel, **kw: calls.append(sel[0] if isinstance(sel, tuple) else sel)
                        or real(self, sel, **kw))
    idx = np.random.default_rng(0).permutation(N)[:150].tolist() + [5, 5, 202]  # shuffled, repeated, the last row
    got = store.read_rows(idx, names=["views", "valid"])
    assert (got["views"][:, 0, 0] == np.array(idx)).all() and (got["valid"] == (np.array(idx) % 7 != 0)).all()
    shards = sorted({i // S for i in idx})
    assert len(calls) == 2 * len(shards)  # one read per array and shard, each with exactly that shard's rows
    for sel, k in zip(calls, shards + shards):
        assert sel.tolist() == sorted({i for i in idx if i // S == k})
    calls.clear()
    whole = store.read_rows(np.arange(N), names=["valid"])["valid"]  # a run of rows: one read, not one per shard
    assert whole.tolist() == [i % 7 != 0 for i in range(N)] and calls == [slice(0, N)]
    assert store.read_rows(range(0), names=["valid"])["valid"].shape == (0,)


def test_damage_check_stats_each_local_file_once_and_walks_no_folder(store, monkeypatch):
    def no_walk(*a, **kw):
        raise AssertionError("a local store's damage check walked its folders")

    monkeypatch.setattr(store.fs, "find", no_walk)
    stats = []
    real = os.stat
    monkeypatch.setattr(integrity.os, "stat", lambda p, *a, **kw: stats.append(p) or real(p, *a, **kw))
    assert integrity.damaged_shards(store) == {}
    chunks = [p for p in stats if "/c/" in str(p)]  # the chunk files' (os.stat also serves fsspec's calls)
    assert len(chunks) == len(set(chunks)) == 2 * store.num_shards  # two arrays: one file per shard each
    views3 = next(p for p in chunks if "/views/c/3/" in p)
    with open(views3, "ab") as f:
        f.write(b"x")
    os.remove(next(p for p in chunks if "/valid/c/40" in p))
    damaged = integrity.damaged_shards(store)
    assert sorted(damaged) == [3, 40]
    assert "holds" in damaged[3] and "is missing" in damaged[40]


def test_extraction_tasks_parse_the_manifest_once_per_process_while_unchanged(tmp_path, monkeypatch):
    from pipeline.data import manifest as manifest_module
    from pipeline.targets import task

    path = str(tmp_path / "m.json")
    write_manifest(_manifest(), path)
    parsed = []
    real = manifest_module.read_manifest
    monkeypatch.setattr(manifest_module, "read_manifest", lambda url: parsed.append(url) or real(url))
    task._parsed_manifest.cache_clear()
    first = task._manifest(path)
    assert all(task._manifest(path) is first for _ in range(50)) and len(parsed) == 1
    write_manifest(_manifest(total=N - 1), path)  # rewritten: read again
    assert task._manifest(path).total == N - 1 and len(parsed) == 2
    remote = "memory://scale-test/m.json"  # an object store's manifest is read every time
    write_manifest(_manifest(), remote)
    task._manifest(remote), task._manifest(remote)
    assert len(parsed) == 4


def test_indexing_keeps_labels_per_tar_names_only_when_seen_and_half_labeled_tars_named(tmp_path):
    """A tar's index holds the labels it uses, not one per sample (the full run's `shard --urls`
    had grown 1.33x in RSS at 1.28 M samples from them), names only when seen, and says which
    sample of a half-labeled tar has none."""
    from pipeline.data.indexing import class_map_of, index_tar
    from pipeline.data.tars import TarShardWriter
    from pipeline.errors import ShardError

    urls = []
    for k, labels in enumerate([[3, 1, 0], [2, None]]):
        url = str(tmp_path / f"t-{k}.tar")
        with TarShardWriter(url) as w:
            for i, lab in enumerate(labels):
                w.add(f"{k}{i:05d}", {"png": b"x", **({} if lab is None else {"cls": str(lab).encode()})})
        urls.append(url)
    indexed = [index_tar(u) for u in urls]
    assert indexed[0].present.dtype == np.int32 and indexed[0].present.tolist() == [0, 1, 3]
    assert (indexed[0].count, indexed[0].unlabeled, indexed[1].unlabeled) == (3, -1, 1)
    assert indexed[1].present.tolist() == [2]
    many = str(tmp_path / "many.tar")
    with TarShardWriter(many) as w:
        for i in range(3000):
            w.add(f"m{i:05d}", {"png": b"x", "cls": str(i % 3).encode()})
    big = index_tar(many)
    assert big.count == 3000 and big.present.tolist() == [0, 1, 2]
    held = sum(v.nbytes for v in vars(big).values() if isinstance(v, np.ndarray))
    assert held <= 3 * 4  # per class, not per sample
    assert indexed[0].names == {}  # unnamed samples: no set per label
    assert class_map_of(indexed[:1], urls[:1], {}) == {"0": 0, "1": 1, "2": 2, "3": 3}
    with pytest.raises(ShardError, match=r"t-1.tar: sample 1 has no class label"):
        class_map_of(indexed, urls, {})


def test_knn_votes_equal_the_one_hot_sum():
    from pipeline.eval.probe import knn_scores

    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 8, generator=gen), torch.randn(50, 8, generator=gen)
    labels = torch.randint(0, 40, (300,), generator=gen)
    votes = knn_scores(train, labels, test, 40, k=7, temperature=0.5, chunk=16)
    sim = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    top, idx = sim.topk(7, dim=1)
    want = (torch.nn.functional.one_hot(labels, 40).float()[idx] * (top / 0.5).exp().unsqueeze(-1)).sum(1)
    torch.testing.assert_close(votes, want)


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_scale
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_scale


def test_growth_and_goals_from_two_runs():
    b = _bench()

    def run(n, cpu, rss):
        stage = {"wall_s": 1.0, "maxrss_mb": rss, "cpu_ms_per_image": cpu, "cpu_ms_per_image_after_startup": cpu}
        return {"count": n, "stages": {"extract_mim": dict(stage)}}

    grow = b.growth(run(100, 2.0, 100.0), run(10_100, 2.1, 110.0))["extract_mim"]
    assert grow["cpu_per_image_ratio_after_startup"] == pytest.approx(1.05)
    assert grow["maxrss_ratio"] == pytest.approx(1.1)
    assert grow["rss_bytes_per_added_sample"] == pytest.approx(10 * 2**20 / 10_000)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scaled_down_run_counts_and_resumes(tmp_path):
    """The benchmark itself at 4096 images in 64 shards: every count it reports, and both resumes."""
    b = _bench()
    n, labeled, size, batch = 4096, 512, 64, 64
    out = tmp_path / "scale.json"
    result = b.main(["--count", str(n), "--labeled", str(labeled), "--shard-size", str(size), "--batch-size",
                     str(batch), "--compare-fraction", "0", "--dvc", "stores", "--work", str(tmp_path / "work"),
                     "--out", str(out)])
    assert json.loads(out.read_text())["wall_s"] == result["wall_s"]
    assert not (tmp_path / "work").exists()  # removed without --keep
    run = result["runs"][str(n)]
    st = run["stages"]
    shards = n // size
    assert run["shards"] == shards and run["probe"]["manifests"]["scale-train"]["total"] == n
    assert run["probe"]["manifests"]["scale-probe-train"]["total"] == labeled - labeled // 5
    for role in ("mim", "disc"):
        assert st[f"inspect_{role}"]["report"] == {**st[f"inspect_{role}"]["report"], "samples": n,
                                                   "shards": shards, "done": shards, "damaged": 0}
        assert st[f"verify_{role}"]["report"] == {"ok": True, "samples": 32}
        assert run["probe"]["stores"][role]["missing"] == 0 and run["probe"]["stores"][role]["damaged"] == 0
    # Extraction was killed part-way and finished by the rerun, which found the done shards.
    assert st["extract_disc_killed"]["killed"] and 0 < st["extract_disc_killed"]["shards_done_at_kill"] < shards
    assert st["extract_disc_resumed"]["returncode"] == 0
    assert 0 < st["extract_disc"]["resume_startup_s"] <= st["extract_disc"]["resume_first_work_s"]
    # Distillation was killed after a mid-epoch checkpoint and resumed from it to the epoch's end.
    steps = n // batch
    assert st["distill_killed"]["killed"] and 0 < st["distill_killed"]["checkpoint_step_at_kill"] < steps
    assert run["distill"]["steps"] == run["probe"]["plan"]["steps"] == steps
    assert 0 < st["distill"]["resume_startup_s"] <= st["distill"]["resume_first_work_s"]
    assert run["evaluate"]["n_train"] == labeled - labeled // 5 and run["evaluate"]["n_test"] == labeled // 5
    assert run["dvc"]["mode"] == "stores" and run["dvc"]["up_to_date"]  # extractions reproduced, the rest committed
    assert {g["goal"] for g in result["goals"]} >= {"inspect <= 5 s", "open a manifest <= 2 s"}


def test_linear_probe_sums_its_loss_block_by_block(monkeypatch):
    from pipeline.eval import probe

    gen = torch.Generator().manual_seed(0)
    x, test = torch.randn(300, 8, generator=gen), torch.randn(40, 8, generator=gen)
    y = torch.randint(0, 12, (300,), generator=gen)
    whole = probe.linear_probe_scores(x, y, test, 1e-3, 5, 12)  # 300 rows: one block
    monkeypatch.setattr(probe, "PROBE_ROWS", 64)  # 5 blocks: the same loss and gradient up to rounding
    blocks = probe.linear_probe_scores(x, y, test, 1e-3, 5, 12)
    torch.testing.assert_close(blocks, whole, rtol=1e-4, atol=1e-4)
