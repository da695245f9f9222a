"""The loader under real torch.distributed (gloo, 2 processes started by torchrun).

Each rank iterates its loader and runs one all_reduce per batch, as DDP does: a rank with more
batches than the other would hang, so the subprocess timeout turns unequal step counts into a
failure rather than a silent pass. Rank 0 gathers every rank's indices and writes them out.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.train.loader import LoaderConfig, steps_per_epoch
from pipeline.targets.store import TargetStore
from stages.extract import ExtractConfig, extract
from test_loader import IMG, MIM, MIM_KW, make_dataset

WORKER = textwrap.dedent(
    """
    import json, sys
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from pipeline.train.loader import LoaderConfig, build_loader, steps_per_epoch

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = json.loads(sys.argv[1])
    results = {}
    for name, job in spec["jobs"].items():
        cfg = LoaderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["cfg"].items()})
        out = {"steps": steps_per_epoch(cfg, world), "epochs": []}
        for epoch in job["epochs"]:
            loader = build_loader(cfg, epoch, rank, world)
            indices, n = [], 0
            for batch in loader:
                t = torch.ones(1)
                dist.all_reduce(t)  # every rank must reach every step
                assert int(t.item()) == world
                indices += batch["index"].tolist()
                n += 1
            gathered = [None] * world
            dist.all_gather_object(gathered, {"rank": rank, "batches": n, "len": len(loader), "indices": indices})
            out["epochs"].append(gathered)
        results[name] = out
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()
    """
)


def _cfg(manifest: str, mim: str, **kw) -> LoaderConfig:
    return LoaderConfig(manifest=manifest, mim_store=mim, seed=11, img_size=IMG, **kw)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Both scenarios in one torchrun launch (process start and imports dominate on a small CPU)."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = {}
    for name, n, corrupt, kw, epochs in (
        ("even", 24, (), dict(batch_size=3, num_workers=2), [0, 1]),
        ("uneven", 22, (8,), dict(batch_size=2, num_workers=1), [0, 1, 2]),
    ):
        manifest = make_dataset(root / name, n=n, corrupt=corrupt)
        url = extract(ExtractConfig(manifest=manifest, teacher=MIM, role="mim", random_init=True, model_kwargs=MIM_KW,
                                    out=str(root / name / "mim.zarr"), views=1, batch_size=32, device="cpu",
                                    progress=False, on_error="skip"))
        jobs[name] = (_cfg(manifest, url, **kw), epochs)
    script = root / "ddp_worker.py"
    script.write_text(WORKER)
    result = root / "result.json"
    spec = {"jobs": {k: {"cfg": dataclasses.asdict(c), "epochs": e} for k, (c, e) in jobs.items()}, "out": str(result)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {k: c for k, (c, _) in jobs.items()}, json.loads(result.read_text())


def test_two_ranks_disjoint_union_all_same_steps(ddp):
    cfgs, results = ddp
    out = results["even"]
    assert out["steps"] == steps_per_epoch(cfgs["even"], 2) == 24 // (3 * 2)
    orders = []
    for gathered in out["epochs"]:
        a, b = (g["indices"] for g in gathered)
        assert [g["batches"] for g in gathered] == [g["len"] for g in gathered] == [out["steps"]] * 2
        assert set(a).isdisjoint(b)
        assert sorted(a + b) == list(range(24))
        orders.append(a)
    assert orders[0] != orders[1]  # a new shard and sample order each epoch


def test_two_ranks_uneven_shards_equal_steps_no_hang(ddp):
    cfgs, results = ddp
    out = results["uneven"]
    store = TargetStore.open(cfgs["uneven"].mim_store)
    valid = {i for k in range(store.num_shards) for i, ok in
             zip(range(k * 6, k * 6 + 6), store.read_shard(k, ["valid"])["valid"]) if ok}
    assert 8 not in valid and len(valid) == 21
    assert out["steps"] == steps_per_epoch(cfgs["uneven"], 2) == (4 + 5) // 2  # two smallest valid shards, batch 2
    for gathered in out["epochs"]:
        assert [g["batches"] for g in gathered] == [g["len"] for g in gathered] == [out["steps"]] * 2
        a, b = (g["indices"] for g in gathered)
        assert set(a).isdisjoint(b) and set(a) | set(b) <= valid
        assert len(a) == len(b) == out["steps"] * 2
