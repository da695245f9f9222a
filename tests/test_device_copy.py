"""pipeline.train.device_copy.ahead_on_device: the batches, unchanged, in order, on the device."""
from __future__ import annotations

import pytest
import torch

from pipeline.train.device_copy import ahead_on_device


def _batches(n: int, log: list):
    for i in range(n):
        log.append(i)
        yield {"image": torch.full((2, 3), float(i)), "index": torch.tensor([i, i + 100]), "name": f"b{i}"}


def test_cpu_passes_batches_through_without_reading_ahead():
    log: list = []
    it = ahead_on_device(_batches(3, log), torch.device("cpu"))
    first = next(it)
    assert log == [0]  # no copy to hide on a CPU, so nothing is read ahead
    assert first["name"] == "b0" and torch.equal(first["image"], torch.zeros(2, 3))
    assert [b["name"] for b in it] == ["b1", "b2"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy stream exists only on CUDA")
def test_cuda_batches_arrive_on_the_device_one_ahead():
    log: list = []
    device = torch.device("cuda", 0)
    pinned = ({k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in b.items()} for b in _batches(4, log))
    it = ahead_on_device(pinned, device)
    got = []
    for b in it:
        assert b["image"].device == device and b["index"].device == device
        assert len(log) == min(len(got) + 2, 4)  # the next batch's copy is already under way
        got.append((b["name"], b["image"].sum().item(), b["index"].tolist()))
    assert got == [(f"b{i}", 6.0 * i, [i, i + 100]) for i in range(4)]
