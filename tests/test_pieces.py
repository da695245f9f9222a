"""The loader's piece buffers (`pipeline.train.pieces`): a worker reuses its shared buffers once the
training process has let a piece go, and never overwrites a piece that is still held."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.train import pieces

ROWS = 4096  # int64 values per piece: 32 KiB


class _Numbered(IterableDataset):
    """Each worker yields `count` pieces; piece i of worker w holds the value 1000 w + i everywhere."""

    def __init__(self, ring: pieces.Ring | None, count: int):
        super().__init__()
        self.ring, self.count = ring, count

    def __iter__(self):
        w = get_worker_info().id
        for i in range(self.count):
            buf, out, slot = pieces.allocate({"x": ((ROWS,), np.dtype(np.int64))}, self.ring)
            out["x"].fill_(1000 * w + i)
            grown = len(self.ring._own) if self.ring is not None else 0
            yield pieces.pack({**out, "w": w, "i": i, "grown": grown}, buf, slot)


def _pieces(ring, count=12):
    loader = DataLoader(_Numbered(ring, count), batch_size=None, num_workers=2, prefetch_factor=2)
    for raw in loader:
        yield raw[pieces.SLOT], pieces.unpack(raw, ring, int(raw["w"]))


def test_pieces_let_go_reuse_the_workers_buffers():
    ring = pieces.Ring(workers=2, slots=5)
    seen = 0
    for slot, piece in _pieces(ring):
        assert torch.all(piece["x"] == 1000 * piece["w"] + piece["i"])
        assert slot >= 0 and piece["grown"] <= 5  # never a fresh buffer: the ring had one free each time
        seen += 1
        del piece
    assert seen == 24
    assert int(ring.busy.sum()) == 0  # every buffer the training process let go is free again


def test_pieces_still_held_are_never_overwritten():
    """A consumer that keeps every piece (or every other) reads each one's own values at the end:
    a held buffer stays busy, and a worker with none free takes fresh shared memory."""
    ring = pieces.Ring(workers=2, slots=2)
    kept, slots = [], []
    for n, (slot, piece) in enumerate(_pieces(ring, count=15)):
        slots.append(slot)
        if n % 2 == 0:
            kept.append(piece)
    assert -1 in slots  # the kept pieces held both buffers of a worker: it went on with fresh ones
    for piece in kept:
        assert torch.all(piece["x"] == 1000 * piece["w"] + piece["i"]), (piece["w"], piece["i"])
    held = int(ring.busy.sum())
    assert held >= 1
    del kept, piece
    assert int(ring.busy.sum()) == 0


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
    assert ring.arrived(0, slot, buf) is buf
    assert int(ring.busy[0, slot]) == 0
