"""A loader piece's tensors in one shared-memory buffer, so a worker sends it through one file
descriptor.

A DataLoader worker sends each tensor it yields through its own file descriptor (torch's
`file_descriptor` sharing: the training process connects back to the worker once per tensor to
receive it), and a piece of encoded targets has 8-15 tensors. Sending one buffer instead took the
training process from 0.114 to 0.101 ms of CPU per image (bench_host's ViT-B fp16 stores, 2
workers, batch 64) and q1pct's from 0.198 to 0.127. Here a piece's stacked rows are views of one buffer (`allocate`),
`pack` replaces them by that buffer and a layout, and `unpack` rebuilds the same views in the
training process, without a copy. A tensor made later (a decoded target, a placed image) travels as
it is. Outside a worker the buffer is plain memory and the round trip is the same views.

A worker's buffers are reused (`Ring`): fresh shared memory costs the kernel a page fault, a zeroed
page and a free per 4 KiB, 20.8 ms of CPU per 24 MB batch against 0.7 ms to write a reused one
(`benchmarks/bench_shm.py`, 0.32 ms per fp16 ViT-B image). The training process says when no tensor
uses a buffer any more through a shared flag per buffer; a worker with no free buffer takes a fresh
one, so a consumer that keeps every batch (a test, an evaluation) only loses the reuse, never waits.
"""
from __future__ import annotations

import json

import numpy as np
import torch

BUFFER, LAYOUT, SLOT = "_buffer", "_layout", "_slot"  # piece keys: packed buffer, its layout (JSON), ring slot
ALIGN = 64  # byte alignment of each tensor in the buffer (any dtype's element size divides it)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _shared(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` in fresh shared memory (what torch's default_collate makes in a worker)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes), 0, (nbytes,))


# Tensors that use a storage, counted by torch (a private call; without it a worker's buffers are
# not reused, see `Ring.supported`)
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class Ring:
    """Each DataLoader worker's reusable shared-memory buffers, `slots` per worker, for one set of
    workers (a new set, a new ring: pieces lost with the old set never come back to free theirs).

    Made in the training process before the workers start (they get a copy of the flags only);
    `busy[w, s]` is shared: a worker sets it when it fills buffer s, the training process clears it
    once no tensor uses that buffer any more (`reclaim`, before it waits for the next piece), or at
    once when the piece arrived already copied (pinned by the DataLoader's pin thread). Whatever
    the consumer makes of a piece (views of any shape, `.numpy()`, sharing with another process)
    keeps using the same storage, which torch counts."""

    def __init__(self, workers: int, slots: int):
        self.busy = torch.zeros(max(1, workers), slots, dtype=torch.uint8).share_memory_()
        self._own: dict[int, torch.Tensor] = {}  # worker side: slot -> its buffer
        # training side: each arrived buffer's storage, kept (a buffer sent again is found in torch's
        # cache of shared storages instead of mapped anew: a page fault per 4 KiB), and those in use
        self._held: dict[tuple[int, int], torch.UntypedStorage] = {}
        self._lent: set[tuple[int, int]] = set()

    @staticmethod
    def supported() -> bool:
        return _use_count is not None

    def __getstate__(self) -> dict:  # a spawned worker gets the flags, not the training side's buffers
        return {"busy": self.busy, "_own": {}, "_held": {}, "_lent": set()}

    def take(self, worker: int, nbytes: int) -> tuple[int, torch.Tensor]:
        """(slot, buffer of at least `nbytes`) for `worker`; slot -1: a fresh buffer, none was free."""
        busy = self.busy[worker].numpy()
        free = np.flatnonzero(busy == 0)
        if not len(free):
            return -1, _shared(nbytes)
        fits = [int(s) for s in free if int(s) in self._own and self._own[int(s)].numel() >= nbytes]
        slot = fits[0] if fits else int(free[0])
        if not fits:  # grown to the largest piece asked for: pieces of one run differ by a few rows
            self._own[slot] = _shared(max(nbytes, max((b.numel() for b in self._own.values()), default=0)))
        busy[slot] = 1
        return slot, self._own[slot]

    def arrived(self, worker: int, slot: int, buf: torch.Tensor) -> None:
        """Slot `slot` of `worker` came in as `buf` (in the training process)."""
        if slot < 0:
            return
        if buf.is_pinned():  # the DataLoader copied it to page-locked memory: the shared buffer is free now
            self.busy[worker, slot] = 0
            return
        self._held[worker, slot] = buf.untyped_storage()
        self._lent.add((worker, slot))

    def reclaim(self) -> None:
        """Frees every lent buffer that only this ring still holds."""
        for key in [k for k in self._lent if _use_count(self._held[k]._cdata) == 1]:
            self._lent.discard(key)
            self.busy[key] = 0


def allocate(specs: dict[str, tuple[tuple[int, ...], np.dtype]], ring: Ring | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(buffer, {key: empty tensor of shape and dtype}, slot) for specs {key: (shape, numpy dtype)}:
    views of one uint8 buffer; in a DataLoader worker shared memory, one of `ring`'s when given
    (slot >= 0) or fresh (slot -1)."""
    from torch.utils.data import get_worker_info

    offsets, total = {}, 0
    for key, (shape, dtype) in specs.items():
        total = -(-total // ALIGN) * ALIGN
        offsets[key] = total
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    info, slot = get_worker_info(), -1
    if info is None:
        buf = torch.empty(total, dtype=torch.uint8)
    elif ring is None:
        buf = _shared(total)
    else:
        slot, buf = ring.take(info.id, total)
        buf = buf[:total]
    return buf, {key: _view(buf, offsets[key], _torch_dtype(dtype), tuple(shape))
                 for key, (shape, dtype) in specs.items()}, slot


def _view(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    return buf[offset:offset + n].view(dtype).view(shape)


def pack(piece: dict, buf: torch.Tensor, slot: int = -1) -> dict:
    """The piece with the tensors that are views of `buf` replaced by `buf` and their layout (and
    its ring slot)."""
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    layout, out = [], {}
    for key, v in piece.items():
        if torch.is_tensor(v) and v.is_contiguous() and lo <= v.data_ptr() and v.data_ptr() + v.nbytes <= hi \
                and v.numel():
            layout.append((key, v.data_ptr() - lo, str(v.dtype).removeprefix("torch."), list(v.shape)))
        else:
            out[key] = v
    out[BUFFER], out[LAYOUT], out[SLOT] = buf, json.dumps(layout), slot
    return out


def unpack(piece: dict, ring: Ring | None = None, worker: int = 0) -> dict:
    """The piece as `pack` got it: its buffer's tensors rebuilt as views (no copy); a `ring` buffer
    is lent to the consumer until no tensor uses it (`Ring.reclaim`)."""
    if BUFFER not in piece:
        return piece
    out = {k: v for k, v in piece.items() if k not in (BUFFER, LAYOUT, SLOT)}
    buf = piece[BUFFER]
    if ring is not None:
        ring.arrived(worker, int(piece[SLOT]), buf)
    for key, offset, dtype, shape in json.loads(piece[LAYOUT]):
        out[key] = _view(buf, offset, getattr(torch, dtype), tuple(shape))
    return out
