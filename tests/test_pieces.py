"""The loader's piece buffers (`pipeline.train.pieces`): a worker reuses its shared buffers once the
training process no longer uses a piece, and never overwrites a piece still used in any form."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.train import pieces

ROWS = 4096  # int64 values per piece: 32 KiB

pytestmark = pytest.mark.skipif(not pieces.Ring.supported(), reason="this torch does not count storage users")


class _Numbered(IterableDataset):
    """Each worker yields `count` pieces; piece i of worker w holds the value 1000 w + i everywhere,
    as `x` and, a view of the same buffer that does not travel in the layout, as `xt` (transposed)."""

    def __init__(self, ring: pieces.Ring | None, count: int):
        super().__init__()
        self.ring, self.count = ring, count

    def __iter__(self):
        w = get_worker_info().id
        for i in range(self.count):
            buf, out, slot = pieces.allocate({"x": ((64, ROWS // 64), np.dtype(np.int64))}, self.ring)
            out["x"].fill_(1000 * w + i)
            grown = len(self.ring._own) if self.ring is not None else 0
            yield pieces.pack({**out, "xt": out["x"].t(), "w": w, "i": i, "grown": grown}, buf, slot)


def _pieces(ring, count=12):
    """(slot, piece) as `RunLoader._batches` takes them: reclaim, wait for a piece, unpack it."""
    it = iter(DataLoader(_Numbered(ring, count), batch_size=None, num_workers=2, prefetch_factor=2))
    while True:
        ring.reclaim()
        raw = next(it, None)
        if raw is None:
            return
        slot = raw[pieces.SLOT]
        yield slot, pieces.unpack(raw, ring, int(raw["w"]))
        del raw


def _holds(piece: dict) -> bool:
    return bool(torch.all(piece["x"] == 1000 * piece["w"] + piece["i"]))


def test_pieces_let_go_reuse_the_workers_buffers():
    ring = pieces.Ring(workers=2, slots=6)
    seen = 0
    for slot, piece in _pieces(ring):
        assert _holds(piece) and piece["x"].is_shared()  # still shared memory: no copy made on arrival
        assert slot >= 0 and piece["grown"] <= 6  # never a fresh buffer: the ring had one free each time
        seen += 1
        del piece
    assert seen == 24
    ring.reclaim()
    assert int(ring.busy.sum()) == 0  # every buffer the training process let go is free again


@pytest.mark.parametrize("keep", ["x", "xt", "numpy"])
def test_pieces_still_used_are_never_overwritten(keep):
    """A consumer that keeps every other piece, as its tensor, a view outside the layout or a numpy
    array, reads each kept one's own values at the end: a used buffer stays busy, and a worker with
    none free takes fresh shared memory."""
    ring = pieces.Ring(workers=2, slots=2)
    kept, slots = [], []
    for n, (slot, piece) in enumerate(_pieces(ring, count=15)):
        slots.append(slot)
        if n % 2 == 0:
            value = {"x": piece["x"], "xt": piece["xt"], "numpy": piece["x"].numpy()}[keep]
            kept.append((1000 * piece["w"] + piece["i"], value))
        del piece
    assert -1 in slots  # the kept pieces held both buffers of a worker: it went on with fresh ones
    for want, value in kept:
        assert (np.asarray(value) == want).all(), want
    del kept, value
    ring.reclaim()
    assert int(ring.busy.sum()) == 0


def test_a_new_ring_after_lost_pieces_reuses_again():
    """Pieces a consumer never took (it stopped early) keep their flags set: the next set of workers
    gets a new ring (`RunLoader.epochs`), whose buffers are all free."""
    ring = pieces.Ring(workers=2, slots=6)
    for n, _ in enumerate(_pieces(ring, count=12)):
        if n == 3:
            break
    ring.reclaim()
    assert int(ring.busy.sum()) > 0  # in flight when the consumer stopped: never freed
    fresh = pieces.Ring(workers=2, slots=6)
    assert all(slot >= 0 for slot, _ in _pieces(fresh, count=8))


def test_a_piece_made_outside_a_worker_is_plain_memory():
    buf, out, slot = pieces.allocate({"x": ((3,), np.dtype(np.float32))}, pieces.Ring(1, 2))
    assert slot == -1 and not buf.is_shared() and out["x"].shape == (3,)
    back = pieces.unpack(pieces.pack(out, buf, slot), pieces.Ring(1, 2))
    assert back["x"].data_ptr() == out["x"].data_ptr()


@pytest.mark.parametrize("nbytes", [10, 5000])
def test_a_buffer_grows_to_the_largest_piece(nbytes):
    ring = pieces.Ring(1, 2)
    slot, buf = ring.take(0, 100)
    ring.busy[0, slot] = 0
    again, bigger = ring.take(0, nbytes)
    assert again == slot and bigger.numel() >= nbytes
    assert (bigger.data_ptr() == buf.data_ptr()) == (nbytes <= 100)  # reused when it fits


def test_a_piece_the_dataloader_pinned_frees_its_buffer_at_once(monkeypatch):
    """On CUDA the DataLoader's pin thread copies each piece to page-locked memory before the
    training process sees it: the shared buffer is free as soon as the copy arrives."""
    ring = pieces.Ring(1, 2)
    slot, buf = ring.take(0, 64)
    assert int(ring.busy[0, slot]) == 1
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: True)  # no CUDA here to pin with
    ring.arrived(0, slot, buf)
    assert int(ring.busy[0, slot]) == 0


def test_a_spawned_worker_gets_the_flags_only():
    ring = pieces.Ring(1, 2)
    ring._held[0, 0] = torch.UntypedStorage(8)
    ring._lent.add((0, 0))
    state = ring.__getstate__()
    assert state["busy"] is ring.busy and not state["_held"] and not state["_lent"] and not state["_own"]
