"""pipeline.run.decode_ahead.prefetched: every batch prepared once, in order, the first one split over two threads."""
import threading

import pytest

from pipeline.run.decode_ahead import prefetched


def _prepare(log):
    def prepare(batch):
        log.append((tuple(batch), threading.current_thread().name))
        return [x * 10 for x in batch]
    return prepare


def test_batches_in_order_and_first_split_across_two_threads():
    batches = [[1, 2, 3, 4, 5], [6, 7], [8]]
    log = []
    got = list(prefetched(batches, _prepare(log), join=lambda a, b: a + b))
    assert got == [(b, [x * 10 for x in b]) for b in batches]
    first = {items: thread for items, thread in log if items in ((1, 2), (3, 4, 5))}
    assert set(first) == {(1, 2), (3, 4, 5)}
    assert first[(1, 2)].startswith("hdpipe-prefetch") and first[(3, 4, 5)] == threading.current_thread().name
    later = [thread for items, thread in log if items in ((6, 7), (8,))]
    assert len(later) == 2 and all(t.startswith("hdpipe-prefetch") for t in later)


def test_without_join_every_batch_is_prepared_whole_on_the_thread():
    log = []
    got = list(prefetched([[1, 2], [3]], _prepare(log)))
    assert got == [([1, 2], [10, 20]), ([3], [30])]
    assert [items for items, _ in log] == [(1, 2), (3,)]
    assert all(thread.startswith("hdpipe-prefetch") for _, thread in log)


@pytest.mark.parametrize("bad", [1, 4])  # the thread's half and the caller's half of the first batch
def test_a_failure_in_either_half_of_the_first_batch_is_raised(bad):
    def prepare(batch):
        if bad in batch:
            raise ValueError(f"bad item {bad}")
        return list(batch)

    with pytest.raises(ValueError, match=f"bad item {bad}"):
        list(prefetched([[1, 2, 3, 4], [5]], prepare, join=lambda a, b: a + b))
