"""Extraction's lossy targets encoded where the teacher computed them, batch by batch.

A codec with `encode_torch` (q1pct, fp16) encodes each batch on the teacher's GPU: the host receives
the stored parts (uint16 codes or float16, half the bytes of float32 targets), spends no CPU on the
codec or its error statistics, and never holds a whole shard of float32 targets;
`TargetStore.write_shard` stores the parts as they are (`quant.Encoded`). The parts are the numpy
encoder's, byte for byte (`pipeline.targets.compact_torch`; fp16: both round to nearest even), so a
store holds the same bytes whichever path wrote it. A teacher on the CPU gets numpy's encoder,
batch by batch: the same bytes at half the time for q1pct (`TORCH_ON_CPU`). Arrays whose codec has no torch
encoder, and a channel-basis array before shard 0's writer has fitted its basis (from float32
values), stay float32 on the host and are encoded at write time as before.

Batches are encoded in turn on the main thread, after the teacher's forward: the compression and
write of the shard still come after its last batch (no overlap with the next batch's forward).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.targets import quant

if TYPE_CHECKING:
    from pipeline.targets.store import TargetStore

# q1pct is many small integer operations: on a CPU, torch's per-operation cost makes compact_torch
# ~2x slower than numpy at one thread (12 vs 26 ms per ViT-B relations view) and far slower when its
# OpenMP threads meet busy cores (benchmarks/bench_q1pct_torch.py). Tests set it to run torch on a CPU.
TORCH_ON_CPU = False


class _Rows:
    """One array's parts for a whole shard [S, V, ...] on the host, filled batch by batch."""

    def __init__(self, codec, shape_tail: tuple[int, ...], basis: np.ndarray | None, rows: int, views: int,
                 device: torch.device):
        self.codec, self.on_torch = codec, device.type != "cpu" or TORCH_ON_CPU
        self.basis = basis if basis is None or not self.on_torch else torch.as_tensor(basis).to(device)
        # Rows no batch fills (samples skipped as unreadable) hold what encoding zeros gives, as on the host.
        zero, _, _ = self._encode(torch.zeros((1,) + tuple(shape_tail), device=device))
        self.parts = {}
        for p, a in zero.items():
            self.parts[p] = np.empty((rows, views) + a.shape[1:], a.dtype)
            self.parts[p][...] = a[0]
        self.err2 = np.zeros((rows, views))
        self.ref2 = np.zeros((rows, views))

    def _encode(self, x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """(parts on the host, ||x_hat - x||² and ||x||² per row) of x [n, *shape_tail]; the error as
        `quant.error_stats` measures it: float32 differences, float64 squares summed."""
        if self.on_torch:
            parts = self.codec.encode_torch(x, 1, self.basis)
            d = (self.codec.decode_torch(parts, channel_basis=self.basis) - x).flatten(1).double()
            ref = x.flatten(1).double()
            return ({p: t.cpu().numpy() for p, t in parts.items()}, (d * d).sum(1).cpu().numpy(),
                    (ref * ref).sum(1).cpu().numpy())
        xn = x.cpu().numpy()
        parts = quant.encode(xn, self.codec.name, view_axes=1, channel_basis=self.basis)
        d = (quant.decode(parts, self.codec.name, self.basis) - xn).reshape(len(xn), -1).astype(np.float64)
        ref = xn.reshape(len(xn), -1).astype(np.float64)
        return parts, (d * d).sum(1), (ref * ref).sum(1)

    def put(self, rows: np.ndarray, views: np.ndarray, x: torch.Tensor) -> None:
        parts, self.err2[rows, views], self.ref2[rows, views] = self._encode(x.float().contiguous())
        for p, a in parts.items():
            self.parts[p][rows, views] = a


class DeviceEncoder:
    """The arrays of one extraction task that are encoded on the teacher's device (`name in encoder`)."""

    def __init__(self, store: "TargetStore", rows: int, device: torch.device | str):
        device = torch.device(device)
        self._arrays: dict[str, _Rows] = {}
        for name, spec in store.arrays.items():
            if spec.precision == quant.LOSSLESS or not spec.per_view:
                continue
            codec = quant.codec(spec.precision)
            if codec.encode_torch is None or codec.decode_torch is None:
                continue
            basis = store.bases.get(name) if spec.uses_channel_basis else None
            if spec.uses_channel_basis and basis is None:
                continue  # shard 0's writer fits it from this shard's float32 values
            self._arrays[name] = _Rows(codec, spec.shape_tail, basis, rows, store.views, device)

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def put(self, name: str, rows: np.ndarray, views: np.ndarray, x: torch.Tensor) -> None:
        """Encode x [n, *shape_tail] (float, on the teacher's device) into rows `rows`, views `views`."""
        self._arrays[name].put(np.asarray(rows), np.asarray(views), x)

    def encoded(self) -> dict[str, quant.Encoded]:
        """{name: quant.Encoded} of the whole shard, for `TargetStore.write_shard`."""
        return {name: quant.Encoded(a.parts, a.err2, a.ref2) for name, a in self._arrays.items()}
