"""Where extraction tasks run: in this process, or one task per shard on dask.distributed.

What runs is `pipeline.targets.task.compute_shard(task, k)` and then the write it returns; this
module only decides where:
- in process (no cluster, nothing to pay on one machine): shards one after the other, each shard's
  store write overlapping the next shard's forward;
- `LocalCluster(n_workers=N, threads_per_worker=2, processes=True)`: one teacher per worker process
  (on a multi-GPU host worker i takes GPU i % count, `pipeline.run.worker.task_device`); of its two
  task threads one computes at a time (`worker.COMPUTE_LOCK`), so a shard's compression and store
  write overlap the next shard's forward, as in process, with dask's own scheduling;
- an existing cluster (`scheduler` address): start one worker per GPU with its own
  `CUDA_VISIBLE_DEVICES` (what dask-cuda's `LocalCUDACluster` does), so each sees one device, and
  `--nthreads 2` for that overlap (with 1 each shard is written after its own forward).
A lost worker's task is retried (`retries`) on another; results are identical because every value
is a pure function of the task and the shard.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from pipeline.targets.task import ShardTask, compute_shard

TASK_THREADS = 2  # a LocalCluster worker's task threads: one computing, one writing the shard before


def shard_task(task: ShardTask, k: int) -> dict:
    """One dask task: compute shard k (one at a time in this process), then compress and write it
    while the worker's other thread computes the next shard; returns the done marker's summary once
    shard k is written."""
    from pipeline.run.worker import COMPUTE_LOCK

    with COMPUTE_LOCK:
        write = compute_shard(task, k)
    return write()


def run_in_process(task: ShardTask, shards: list[int], on_done: Callable[[dict], None],
                   progress: Callable[[int], None] | None = None) -> None:
    """Shards one after the other; shard k's compression and store write (one writer thread) overlap
    the next shard's decode and teacher forward. `on_done(summary)` follows each finished write, in
    shard order; a failed write raises here once the shard after it is computed, and an error while
    computing waits for the write in flight (its done marker, written last, is all or nothing)."""
    from concurrent.futures import ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdpipe-store-write") as writer:
        pending = None
        try:
            for k in shards:
                write = compute_shard(task, k, progress=progress)
                if pending is not None:
                    on_done(pending.result())
                pending = writer.submit(write)
            if pending is not None:
                done, pending = pending, None
                on_done(done.result())
        finally:
            if pending is not None:
                wait([pending])


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
        # A worker is one teacher on one device (torch uses the cores itself); its second thread only
        # writes the shard before while the first computes (`shard_task`).
        cluster = LocalCluster(n_workers=workers, threads_per_worker=TASK_THREADS, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    futures = []
    remote = task.for_workers()
    try:
        keys = [f"{name}-{k:06d}-{os.getpid()}-{time.time_ns()}" for k in shards]
        waves = [slice(0, 1), slice(1, None)] if first_alone else [slice(None)]
        for wave in waves:
            futures = client.map(shard_task, [remote] * len(shards[wave]), shards[wave], retries=retries,
                                 pure=False, key=keys[wave])
            for fut in as_completed(futures):
                on_done(fut.result())
    finally:
        client.cancel(futures)
        client.close()
        if cluster is not None:
            cluster.close()
