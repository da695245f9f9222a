"""One extraction task: tar shard k -> Zarr shard k of a target store (done marker written last).

`compute_shard(task, k)` and the write it returns run in the driver process or on a dask worker; everything it needs is
rebuilt from the `ShardTask` (plain, picklable; the teacher comes from the process's cache). The
whole tar is read first (its sha256 checked against the manifest), then images are decoded and
rendered on a prefetch thread batch by batch while the teacher runs. An unreadable image stops the
shard (`on_error: fail`, nothing of it is written) or is stored as valid=false (`skip`). Every
value is a pure function of (teacher weights, view plan, sample index, view id), so a resumed or
retried shard is identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline import urls
from pipeline.errors import ShardError, StoreError
from pipeline.targets.teachers import TeacherSource


@dataclass(frozen=True)
class ShardTask:
    """What a worker needs to extract any shard of one store."""

    manifest: str  # dataset manifest (path or URL)
    store: str  # the target store being written (created by the driver)
    source: TeacherSource  # the teacher's weights, as the store records them
    mim_store: str | None  # discriminative teachers: the MIM store holding the views and masks
    batch_size: int  # views per teacher forward
    device: str  # auto | cpu | cuda | cuda:N (under dask: the worker's own GPU)
    on_error: str  # unreadable image: "fail" or "skip" (valid=false)

    def for_workers(self) -> "ShardTask":
        """Local relative paths made absolute: a worker of an external cluster may run in another
        folder (paths must still be visible to it: a shared file system or an fsspec URL)."""
        source = dataclasses.replace(self.source, checkpoint=urls.absolute(self.source.checkpoint))
        return dataclasses.replace(self, manifest=urls.absolute(self.manifest), store=urls.absolute(self.store),
                                   mim_store=urls.absolute(self.mim_store), source=source)


def _manifest(url: str):
    """The manifest, parsed once per process while its file is unchanged. `compute_shard` runs once
    per shard: parsing a 1,252-shard manifest (250 KB) every time cost 12 ms a shard, a total that
    grows with the square of the shard count. An object store's manifest is read every time."""
    from pipeline.data.manifest import read_manifest

    fs, path = urls.fs_and_path(url)
    if not urls.is_local_fs(fs):
        return read_manifest(url)
    try:
        st = os.stat(path)
    except OSError:
        return read_manifest(url)  # its own error names the manifest
    return _parsed_manifest(url, (st.st_size, st.st_mtime_ns, st.st_ino))


@functools.lru_cache(maxsize=4)
def _parsed_manifest(url: str, stamp: tuple):
    from pipeline.data.manifest import read_manifest

    return read_manifest(url)


@dataclass
class Row:
    """One sample of a tar shard, still encoded: images are decoded batch by batch on the prefetch
    thread, so a shard of 1024 ImageNet JPEGs costs ~110 MB of bytes, not ~600 MB of pixels."""

    index: int  # global sample index
    name: str  # original relative path (for messages)
    data: bytes  # the encoded image as stored in the tar
    error: str | None = None  # why the image could not be decoded (set when on_error=skip)


def compute_shard(task: ShardTask, k: int, progress: Callable[[int], None] | None = None) -> Callable[[], dict]:
    """Every target of tar shard k, computed; returns the write of Zarr shard k (compression, the
    store write, the done marker last), which returns the marker's summary. A caller may run the
    write on another thread while it computes the next shard (`pipeline.run.executor`)."""
    import torch

    from pipeline.data.images import decode_image
    from pipeline.data.reading import read_shard_records
    from pipeline.data.views import View, ViewPlan
    from pipeline.provenance import code_version
    from pipeline.run.decode_ahead import prefetched
    from pipeline.run.worker import cached_teacher, task_device, worker_identity, worker_rank
    from pipeline.targets.compute import disc_batch, mim_batch
    from pipeline.targets.device_encode import DeviceEncoder
    from pipeline.targets.pixels import StudentPixels, render_views, stored_patches
    from pipeline.targets.store import TargetStore

    t0 = time.perf_counter()
    manifest = _manifest(task.manifest)
    store = TargetStore.open(task.store, mode="r+")
    attrs = store.attrs
    role = attrs["role"]
    device = task_device(task.device)
    teacher = cached_teacher(task.source, device)
    if teacher.weights_digest != attrs["weights_digest"]:
        raise StoreError(
            f"teacher {task.source.name} on this worker has weights digest {teacher.weights_digest[:12]} but the "
            f"store {task.store} was created with {attrs['weights_digest'][:12]}; every worker must load the "
            "same weights"
        )
    info = manifest.shards[k]
    # The whole tar is read (and its sha256 checked) before any of it reaches the teacher.
    rows = [Row(int(s["index"]), str(s.get("name", "")), s["image"]) for s in read_shard_records(manifest, k)]
    S, V = len(rows), store.views
    size, interp = teacher.img_size, teacher.interpolation
    px = StudentPixels.from_attrs(attrs)  # the student's views to store too (MIM stores made with them)
    valid = np.ones(S, dtype=bool)
    # Whole-shard outputs, filled batch by batch; rows of unreadable samples stay zero (valid=false).
    # Lossy arrays whose codec encodes in torch (q1pct) are encoded on the teacher's device instead.
    encoder = DeviceEncoder(store, S, device)
    out = {name: np.zeros(((S, V) if spec.per_view else (S,)) + spec.shape_tail, dtype=spec.dtype)
           for name, spec in store.arrays.items() if name not in encoder}
    if role == "mim":
        plan = ViewPlan.from_attrs(attrs["view_plan"])
        layers, extras = tuple(attrs["relation_layers"]), tuple(attrs["extra_targets"])
        mim_views = keep_src = None
    else:
        plan = None
        got = TargetStore.open(task.mim_store).read_shard(k, names=["views", "keep_progressive", "valid"])
        valid &= got["valid"].astype(bool)  # no views or masks exist for samples the MIM run skipped
        mim_views, keep_src = got["views"], got["keep_progressive"]  # [S, V, 5], int16 [S, V, n_keep]
    items = [(r, v) for r in range(S) if valid[r] for v in range(V)]
    batches = [items[i:i + task.batch_size] for i in range(0, len(items), task.batch_size)]

    def prepare(batch):
        """([B] float32 [3, size, size] views in [0, 1], ok bool [B], [B] uint8 [3, S, S] student
        views when the store holds them) for (row, view) pairs.

        Runs on the prefetch thread: only decoding and rendering (PIL) happen here; stacking and
        normalizing stay on the main thread so the two threads do not both start torch's OpenMP
        thread team (on a CPU host that oversubscribes the cores the forward pass needs)."""
        images = {}
        for r in dict.fromkeys(r for r, _ in batch):
            try:
                images[r] = decode_image(rows[r].data, f"image {rows[r].index:09d} ({rows[r].name}) in shard {k} "
                                                       f"({info.url})", max_pixels=manifest.max_image_pixels)
            except ShardError as e:
                if task.on_error == "fail":
                    raise ShardError(f"{e}; re-run with --on-error skip to store it as valid=false") from None
                rows[r].error = str(e)
        xs, ok, us = [], [], []
        for r, v in batch:
            if r not in images:
                xs.append(torch.zeros(3, size, size))
                ok.append(False)
                if px is not None:
                    us.append(torch.zeros(3, px.img_size, px.img_size, dtype=torch.uint8))
                continue
            if plan is not None:  # MIM: the view is a pure function of (seed, index, view id)
                view = plan.view(rows[r].index, v, *images[r].size)
                out["views"][r, v] = view.as_row()
            else:  # disc: exactly the view the MIM teacher saw
                view = View.from_row(mim_views[r, v])
            x, u = render_views(images[r], view, size, interp, px)  # one render when student and teacher agree
            xs.append(x)
            ok.append(True)
            if u is not None:
                us.append(u)
        return xs, np.array(ok), us

    with torch.inference_mode():
        def join(first, second):  # prepare(a + b) from prepare(a) and prepare(b)
            return first[0] + second[0], np.concatenate([first[1], second[1]]), first[2] + second[2]

        for batch, (xs, ok, us) in prefetched(batches, prepare, join):
            x = teacher.normalize(torch.stack(xs))  # [B, 3, size, size] on the teacher's device
            if role == "mim":
                res = mim_batch(teacher, x, layers, extras, float(attrs["mask"]["ratio"]), attrs["tokens"])
                if px is not None:  # the kept patches are known only now (progressive masks)
                    res["student_pixels"] = stored_patches(torch.stack(us), res["keep_progressive"], attrs["tokens"],
                                                           teacher.grid)
            else:
                keep = torch.as_tensor(np.stack([keep_src[r, v] for r, v in batch]).astype(np.int64))
                res = disc_batch(teacher, x, keep.to(device), attrs["tokens"])
            rr = np.array([r for r, _ in batch])[ok]
            vv = np.array([v for _, v in batch])[ok]
            for name, t in res.items():
                t = t[torch.as_tensor(ok, device=t.device)]
                if name in encoder:
                    encoder.put(name, rr, vv, t)
                else:
                    out[name][rr, vv] = (t.float() if t.is_floating_point() else t).cpu().numpy()
            if progress is not None:
                progress(len(batch))
    for r, row in enumerate(rows):
        if row.error is not None:
            valid[r] = False
    out["valid"] = valid
    skipped = [{"index": row.index, "name": row.name, "reason": row.error or "invalid in the MIM store"}
               for row, ok in zip(rows, valid) if not ok]
    summary = {"shard": k, "rows": S, "views": int(valid.sum()) * V, "skipped": skipped,
               "seconds": round(time.perf_counter() - t0, 3), "device": str(device), "pid": os.getpid(),
               "worker": worker_rank(), "dask_worker": worker_identity(),
               "autocast": "bf16" if device.type == "cuda" else "none",
               "code_version": code_version()}
    arrays = {**out, **encoder.encoded()}

    def write() -> dict:
        # Opened again: the write may run after an earlier shard's (on the writer thread) has fitted
        # the store's channel basis, which this shard's handle read as not yet fitted.
        TargetStore.open(task.store, mode="r+").write_shard(k, arrays, summary)  # finiteness checked first
        return summary

    return write
