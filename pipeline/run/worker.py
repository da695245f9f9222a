"""What a worker process keeps between tasks: its device and its loaded teachers.

Loading a ViT-B costs seconds and ~350 MB, and a dask worker runs many shard tasks, so each
process keeps its teachers, keyed by everything that decides the weights (`TeacherSource.key`)
and the device: a worker that later runs another teacher never reuses the wrong model.
Random-init weights come from a fixed seed, so every process builds the same model; stores check
the weights digest anyway.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pipeline.targets.teachers import Teacher, TeacherSource

_TEACHERS: dict[tuple[str, str], "Teacher"] = {}
# One shard computes at a time in a process (one teacher, one device); its compression and store write
# run outside the lock, so a worker with two task threads writes shard k while it computes the next.
COMPUTE_LOCK = threading.Lock()


def worker_rank() -> int | None:
    """Index of this dask worker (LocalCluster names workers 0..N-1), None outside dask."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    name = worker.name
    if isinstance(name, int):
        return name
    if isinstance(name, str) and name.isdigit():
        return int(name)
    return 0


def worker_identity() -> dict | None:
    """{"name", "address"} of this dask worker (recorded in done markers: who wrote a shard), None outside dask."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    return {"name": str(worker.name), "address": str(worker.address)}


def task_device(preference: str = "auto") -> "torch.device":
    """The device this process computes on: under dask, worker i of a multi-GPU host takes GPU i % count."""
    from pipeline.device import pick_device

    return pick_device(preference, local_rank=worker_rank())


def cached_teacher(source: "TeacherSource", device: "torch.device") -> "Teacher":
    """The teacher of `source` on `device`, loaded once per process."""
    key = (source.key(), str(device))
    teacher = _TEACHERS.get(key)
    if teacher is None:
        teacher = _TEACHERS[key] = source.load(device)
    return teacher
