"""Where extraction tasks run: in this process, or one task per shard on dask.distributed.

What runs is `pipeline.targets.task.extract_shard(task, k)`; this module only decides where:
- in process (no cluster, nothing to pay on one machine): shards one after the other;
- `LocalCluster(n_workers=N, threads_per_worker=1, processes=True)`: one teacher per worker process
  (on a multi-GPU host worker i takes GPU i % count, `pipeline.run.worker.task_device`);
- an existing cluster (`scheduler` address): start one worker per GPU with its own
  `CUDA_VISIBLE_DEVICES` (what dask-cuda's `LocalCUDACluster` does), so each sees one device.
A lost worker's task is retried (`retries`) on another; results are identical because every value
is a pure function of the task and the shard.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from pipeline.targets.task import ShardTask, extract_shard


def run_in_process(task: ShardTask, shards: list[int], on_done: Callable[[dict], None],
                   progress: Callable[[int], None] | None = None) -> None:
    for k in shards:
        on_done(extract_shard(task, k, progress=progress))


def run_dask(task: ShardTask, shards: list[int], on_done: Callable[[dict], None], *, workers: int = 0,
             scheduler: str | None = None, retries: int = 2, name: str = "extract", first_alone: bool = False) -> None:
    """One task per shard on a LocalCluster of `workers` processes, or on the cluster at `scheduler`.

    `first_alone`: the first shard runs (and finishes) before the others are submitted: its writer
    fits what every other shard needs (a q1pct store's channel basis, `pipeline.targets.bases`).
    """
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        # One thread per worker: a worker is one teacher on one device; torch uses the cores itself.
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    futures = []
    remote = task.for_workers()
    try:
        keys = [f"{name}-{k:06d}-{os.getpid()}-{time.time_ns()}" for k in shards]
        waves = [slice(0, 1), slice(1, None)] if first_alone else [slice(None)]
        for wave in waves:
            futures = client.map(extract_shard, [remote] * len(shards[wave]), shards[wave], retries=retries,
                                 pure=False, key=keys[wave])
            for fut in as_completed(futures):
                on_done(fut.result())
    finally:
        client.cancel(futures)
        client.close()
        if cluster is not None:
            cluster.close()
