"""Prepare the next batch on a thread while the caller computes on this one."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

# One prefetch thread per process, reused by every shard: a fresh thread per shard would get a
# fresh glibc malloc arena each time, and retained arenas make peak RSS grow with the shard count.
_PREFETCH: ThreadPoolExecutor | None = None


def prefetched(batches: list, prepare: Callable) -> Iterator:
    """(batch, prepare(batch)) pairs, preparing batch i+1 on a thread while the caller runs batch i.

    Decoding and rendering (PIL, which releases the GIL) then overlap the teacher's forward, which is
    what keeps extraction close to a pure teacher forward.
    """
    global _PREFETCH
    if not batches:
        return
    if _PREFETCH is None:
        _PREFETCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdpipe-prefetch")
    future = _PREFETCH.submit(prepare, batches[0])
    try:
        for i, batch in enumerate(batches):
            ready = future.result()
            if i + 1 < len(batches):
                future = _PREFETCH.submit(prepare, batches[i + 1])
            yield batch, ready
    finally:
        future.cancel()  # a failed batch leaves nothing queued behind it
