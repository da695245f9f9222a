"""Batches on the training device one step ahead: the host-to-GPU copy of batch j+1 runs on a side
CUDA stream while step j computes.

    for batch in ahead_on_device(iter(loader), device): ...

On CUDA the loader's batches are in page-locked memory (`LoaderConfig.pin_memory`), so
`non_blocking` copies are truly asynchronous; issuing the next batch's copy *before* handing out
the current one is what lets it overlap (the step ends with a host sync when it reads its loss,
so a copy issued after that would wait for nothing and overlap nothing). The consumer's stream
waits for the copy stream before it touches a batch, and each tensor is recorded on the consumer's
stream so its memory is not reused while the step still reads it.

Hand-written rather than timm's `PrefetchLoader`, which prefetches the same way but takes
(input, target) tuple batches and normalizes only the input: stage two's batches are dicts of
several tensors (pixels, keep_index, relations, features, ...), and only the pixels are normalized.

On CPU (or any non-CUDA device) batches pass through (a uint8 image is normalized in place of
the copy): there is no copy to hide.
The iterator holds one batch beyond the one handed out; a caller that stops early (a mid-epoch
checkpoint) loses nothing, because the epoch's position is counted in batches *consumed* and a
resume replays from there.
"""
from __future__ import annotations

from typing import Iterator

import torch


def ahead_on_device(batches: Iterator[dict], device: torch.device, normalize: tuple | None = None) -> Iterator[dict]:
    """`batches` with every tensor on `device`; on CUDA the copy of the next batch overlaps the step.

    `normalize` (mean, std): a uint8 `image` (the loader's image_transport "uint8") becomes the
    student's float input on the device (`pipeline.train.loader.normalize_image`), after a copy of a
    quarter of the bytes. Targets the loader left encoded and student patches it left unplaced
    (`target_rows.TARGETS` in the batch) are finished here, on the device, after the copy.
    """
    from pipeline.train.loader import normalize_image
    from pipeline.train.target_rows import TARGETS, finish_batch

    def finish(batch: dict) -> dict:
        if TARGETS in batch:  # loader target_transport "encoded": decode targets, place stored patches here
            batch = finish_batch(batch, batch[TARGETS])
        if normalize is not None and batch.get("image") is not None and batch["image"].dtype == torch.uint8:
            batch = {**batch, "image": normalize_image(batch["image"], *normalize)}
        return batch

    if device.type != "cuda":
        yield from (finish(b) for b in batches)
        return
    copy_stream = torch.cuda.Stream(device)

    def start_copy(batch: dict | None) -> dict | None:
        if batch is None:
            return None
        with torch.cuda.stream(copy_stream):
            return finish({k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()})

    upcoming = start_copy(next(batches, None))
    while upcoming is not None:
        current = upcoming
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        for v in current.values():
            if torch.is_tensor(v) and v.device.type == "cuda":
                v.record_stream(compute)
        upcoming = start_copy(next(batches, None))  # issued before step j runs: it overlaps it
        yield current
