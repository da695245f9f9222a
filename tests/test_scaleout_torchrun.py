"""Multi-node stage two with the real launcher: two `torchrun --nnodes 2 --nproc_per_node 1` "nodes"
on loopback, c10d rendezvous, gloo. They take equal steps, end with the same weights, follow the
loss curve of one process fed both ranks' batches, and a SIGKILLed node ends the other one instead
of hanging it; `--resume` then finishes the run on the curve of an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stores import free_port
from toydata import feed_one_process_both_ranks
from test_distill import STUDENT_KW, _cfg, _steps, world  # noqa: F401 (the module's store fixture)

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _params(world, tmp_path, name, **kw) -> Path:  # noqa: F811
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in
           dict(manifest=world["manifest"], mim_store=world["mim"], disc_store=world["disc"],
                model="vit_tiny_patch16_224", model_kwargs=STUDENT_KW, epochs=2, batch_size=4, workers=0,
                base_lr=0.05, warmup_epochs=0.5, runs_dir=str(tmp_path / "runs"), name=name, checkpoint_every=0,
                device="cpu", print_every=0).items()}
    cfg.update(kw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"distill": cfg}))
    return path


def _nodes(params: Path, port: int, *extra: str) -> list[subprocess.Popen]:
    """Node 0 hosts the rendezvous store; each node is its own process group (a kill takes it whole)."""
    procs = []
    for rank in (0, 1):
        cmd = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"hdpipe-{port}",
               "--rdzv-conf", f"is_host={1 if rank == 0 else 0}", "--max-restarts", "0",
               "-m", "pipeline.cli", "distill", "--config", str(params), *extra]
        log = open(params.with_suffix(f".node{rank}.log"), "ab")
        procs.append(subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _kill_node(pid: int) -> None:
    """SIGKILL a node whole: its torchrun agent and every process under it (the agent starts its
    workers in sessions of their own, so killing its process group alone would leave them running)."""
    import psutil

    agent = psutil.Process(pid)
    for proc in [agent, *agent.children(recursive=True)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _wait(procs, timeout=300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def test_two_nodes_equal_steps_weights_and_one_process_curve(world, tmp_path, monkeypatch):  # noqa: F811
    params = _params(world, tmp_path, "nodes")
    codes = _wait(_nodes(params, free_port()))
    assert codes == [0, 0], params.with_suffix(".node0.log").read_text()[-3000:]
    run = tmp_path / "runs" / "nodes"
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["step"] == ranks[1]["step"] == 4  # 3 shards over 2 ranks: 8 samples each, 2 steps x 2 epochs
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"]
    # one process, global batch 8 = both ranks' batches of 4 concatenated (as test_distill's DDP test)
    from stages.distill import distill

    feed_one_process_both_ranks(monkeypatch, rank_batch=4)
    one = _steps(distill(_cfg(world, tmp_path, name="one", epochs=2, checkpoint_every=0, batch_size=8)))
    nodes = _steps(run)
    assert len(one) == len(nodes) == 4
    for a, b in zip(nodes, one):  # gloo all-reduce sums gradients in another order: float tolerance
        for k in ("loss", "loss_features", "loss_relations"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)


def test_killed_node_ends_the_other_and_resume_continues(world, tmp_path):  # noqa: F811
    reference = _params(world, tmp_path, "reference", epochs=10)
    assert _wait(_nodes(reference, free_port())) == [0, 0]
    params = _params(world, tmp_path, "killed", epochs=10, checkpoint_every=1)
    procs = _nodes(params, free_port())
    run = tmp_path / "runs" / "killed"
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = [json.loads(ln).get("step", 0) for ln in (run / "log.jsonl").read_text().splitlines()] \
            if (run / "log.jsonl").exists() else []
        if steps and max(steps) >= 3:
            break
        time.sleep(0.05)
    _kill_node(procs[1].pid)
    code0 = procs[0].wait(timeout=180)  # node 0 must notice and end, not hang in a collective
    procs[1].wait(timeout=30)
    assert code0 != 0, "node 0 finished the run before node 1 was killed"
    assert (run / "checkpoints" / "last.pt").exists()
    codes = _wait(_nodes(params, free_port(), "--resume"))
    assert codes == [0, 0], params.with_suffix(".node0.log").read_text()[-3000:]
    resumed, whole = _steps(run), _steps(tmp_path / "runs" / "reference")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(1, 21))
    for a, b in zip(resumed, whole):
        for k in ("loss", "loss_features", "loss_relations"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)
