"""Prepare the next batch on a thread while the caller computes on this one."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

# One prefetch thread per process, reused by every shard: a fresh thread per shard would get a
# fresh glibc malloc arena each time, and retained arenas make peak RSS grow with the shard count.
_PREFETCH: ThreadPoolExecutor | None = None


def prefetched(batches: list, prepare: Callable, join: Callable | None = None) -> Iterator:
    """(batch, prepare(batch)) pairs, preparing batch i+1 on a thread while the caller runs batch i.

    Decoding and rendering (PIL, which releases the GIL) then overlap the teacher's forward, which is
    what keeps extraction close to a pure teacher forward. Only the first batch has nothing to overlap
    with: given `join(prepare(first half), prepare(second half)) == prepare(batch)`, its two halves are
    prepared at once, on the thread and by the caller, which would otherwise sit idle (a whole batch
    of decoding per shard, ~2% of a ViT-S extraction on two cores).
    """
    global _PREFETCH
    if not batches:
        return
    if _PREFETCH is None:
        _PREFETCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdpipe-prefetch")
    first = batches[0]
    if join is not None and len(first) > 1:
        half = _PREFETCH.submit(prepare, first[:len(first) // 2])
        try:
            mine = prepare(first[len(first) // 2:])
        except BaseException:
            half.cancel()
            raise
        ready = join(half.result(), mine)
    else:
        ready = _PREFETCH.submit(prepare, first).result()
    future = None
    try:
        for i, batch in enumerate(batches):
            if i > 0:
                ready = future.result()
            if i + 1 < len(batches):
                future = _PREFETCH.submit(prepare, batches[i + 1])
            yield batch, ready
    finally:
        if future is not None:
            future.cancel()  # a failed batch leaves nothing queued behind it
