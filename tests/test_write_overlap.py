"""Extraction in one process overlaps shard k's store write with shard k+1's compute
(`pipeline.run.executor.run_in_process`), and keeps its guarantees: summaries in shard order, a
failed write is an error, an error while computing waits for the write in flight.

The shard work is replaced by closures that block on events, so the overlap is shown, not timed:
shard 0's write waits until shard 1's compute has started, which only an overlapping executor
allows (a sequential one would time out the wait and fail the test). Real stores written through
this executor are byte-compared in tests/test_device_encode.py and test_extract.py.
"""
from __future__ import annotations

import threading

import pytest

from pipeline.run import executor


def _fake(monkeypatch, fail_write: int | None = None, fail_compute: int | None = None):
    events = []
    started = {k: threading.Event() for k in range(4)}
    lock = threading.Lock()

    def log(what):
        with lock:
            events.append(what)

    def compute_shard(task, k, progress=None):
        started[k].set()
        log(("compute", k))
        if k == fail_compute:
            raise RuntimeError(f"compute {k} failed")

        def write():
            if k + 1 in started and k + 1 != 4:
                # Only an executor that computes shard k+1 while k is being written gets past this.
                assert started[k + 1].wait(10), f"shard {k + 1} did not start while shard {k} was written"
            log(("written", k))
            if k == fail_write:
                raise OSError(f"write {k} failed")
            return {"shard": k}

        return write

    monkeypatch.setattr(executor, "compute_shard", compute_shard)
    return events


def test_writes_overlap_the_next_compute_and_finish_in_order(monkeypatch):
    events = _fake(monkeypatch)
    done = []
    executor.run_in_process(None, [0, 1, 2, 3], lambda s: done.append(s["shard"]))
    assert done == [0, 1, 2, 3]
    assert events.index(("compute", 1)) < events.index(("written", 0))  # shard 1 computed during 0's write
    assert set(events) == {(w, k) for w in ("compute", "written") for k in range(4)}


def test_a_failed_write_is_raised_and_later_shards_are_not_reported(monkeypatch):
    _fake(monkeypatch, fail_write=1)
    done = []
    with pytest.raises(OSError, match="write 1 failed"):
        executor.run_in_process(None, [0, 1, 2, 3], lambda s: done.append(s["shard"]))
    assert done == [0]


def test_a_compute_error_waits_for_the_write_in_flight(monkeypatch):
    events = _fake(monkeypatch, fail_compute=2)
    done = []
    with pytest.raises(RuntimeError, match="compute 2 failed"):
        executor.run_in_process(None, [0, 1, 2, 3], lambda s: done.append(s["shard"]))
    # shard 1's write was in flight when shard 2's compute failed: it finished before the error left
    assert ("written", 1) in events and done == [0]


def test_dask_workers_write_a_shard_while_they_compute_the_next(monkeypatch):
    """On dask (a real scheduler; one worker of two threads, in this process so the fake reaches it),
    shard k's write waits until shard k+1's compute has started on the same worker: only the
    overlapping task layout (`executor.shard_task`) gets past it. Computes never run two at once."""
    from distributed import LocalCluster

    events = _fake(monkeypatch)
    computing, most = [0], [0]
    fake = executor.compute_shard
    lock = threading.Lock()

    def counted(task, k, progress=None):
        with lock:
            computing[0] += 1
            most[0] = max(most[0], computing[0])
        try:
            return fake(task, k, progress)
        finally:
            with lock:
                computing[0] -= 1

    monkeypatch.setattr(executor, "compute_shard", counted)

    class _Task:  # what run_dask uses of a ShardTask
        def for_workers(self):
            return self

    done = []
    with LocalCluster(n_workers=1, threads_per_worker=executor.TASK_THREADS, processes=False,
                      dashboard_address=None) as cluster:
        executor.run_dask(_Task(), [0, 1, 2, 3], lambda s: done.append(s["shard"]), scheduler=cluster.scheduler_address,
                          retries=0)
    assert sorted(done) == [0, 1, 2, 3] and most[0] == 1
    for k in range(3):
        assert events.index(("compute", k + 1)) < events.index(("written", k))
