"""Extraction on an external dask.distributed cluster, started here as real processes on loopback:
`dask scheduler` and two `dask worker --nthreads 2` (no nanny, each in its own working folder, so
nothing may rely on the driver's). The store equals an in-process extraction file for file, and
SIGKILL of a worker in the middle of a task still finishes with the same store (the scheduler
hands the lost task to the other worker); done markers name the worker that wrote each shard."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.targets.store import TargetStore
from stages.extract import extract
from stores import chunk_files, free_port
from test_extract import make_dataset, mim_cfg

pytestmark = pytest.mark.slow
DASK = str(Path(sys.executable).parent / "dask")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def cluster(tmp_path):
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = {}
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name, args):
        cwd = tmp_path / name
        cwd.mkdir()
        procs[name] = subprocess.Popen([DASK, *args], cwd=cwd, env=ENV, stdout=open(logs / f"{name}.log", "wb"),
                                       stderr=subprocess.STDOUT)

    start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"])
    for name in ("w0", "w1"):
        start(name, ["worker", address, "--nthreads", "2", "--no-nanny", "--name", name, "--no-dashboard",
                     "--local-directory", str(tmp_path / name)])
    deadline = time.time() + 60
    client = None
    while client is None:
        try:
            client = Client(address, timeout=2)
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    client.wait_for_workers(2, timeout=60)
    try:
        yield {"address": address, "procs": procs, "client": client}
    finally:
        client.close()
        for p in procs.values():
            p.kill()
            p.wait(timeout=30)


def test_external_cluster_writes_the_same_store(cluster, tmp_path):
    manifest = make_dataset(tmp_path / "data", n=32, seed=5)  # 4 shards
    cfg = mim_cfg(manifest, tmp_path / "local", views=2)
    local = extract(cfg)
    remote = extract(replace(cfg, targets=str(tmp_path / "remote"), scheduler=cluster["address"], retries=1))
    assert chunk_files(remote) == chunk_files(local)
    writers = {TargetStore.open(remote).done_marker(k)["dask_worker"]["name"] for k in range(4)}
    assert writers <= {"w0", "w1"} and writers  # shards ran on the cluster's workers, named in the markers


def test_killed_worker_mid_task_still_gives_the_same_store(cluster, tmp_path):
    manifest = make_dataset(tmp_path / "data", n=64, seed=6)  # 8 shards
    cfg = mim_cfg(manifest, tmp_path / "local", views=4, batch_size=4)
    local = extract(cfg)
    args = [sys.executable, "-m", "pipeline.cli", "extract", "--manifest", manifest, "--teacher", cfg.teacher,
            "--role", "mim", "--random-init", "--model-kwargs", "{img_size: 64, patch_size: 8, depth: 6}",
            "--views", "4", "--batch-size", "4", "--targets", str(tmp_path / "remote"), "--name", "mim",
            "--scheduler", cluster["address"], "--retries", "2", "--device", "cpu", "--no-progress"]
    run = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client, killed = cluster["client"], None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and run.poll() is None:
        for address, keys in client.processing().items():
            info = client.scheduler_info()["workers"].get(address, {})
            if keys and info.get("name") == "w0":  # w0 is inside a task right now
                cluster["procs"]["w0"].send_signal(signal.SIGKILL)
                killed = list(keys)
                break
        time.sleep(0.01)
    out, err = run.communicate(timeout=300)
    assert killed, "w0 was never seen running a task"
    assert run.returncode == 0, err.decode()[-3000:]
    assert cluster["procs"]["w0"].wait(timeout=30) == -signal.SIGKILL
    remote = out.decode().strip().splitlines()[-1]
    assert chunk_files(remote) == chunk_files(local)
    markers = [TargetStore.open(remote).done_marker(k) for k in range(8)]
    assert "w1" in {m["dask_worker"]["name"] for m in markers}
