"""`fp16`: a float16 copy.

Error is float16 rounding: |x_hat - x| <= |x| * 2**-11 (about 0.05%) in float16's normal range,
<= 2**-25 below it (subnormals). Values beyond +-65504 are refused, not turned into inf.
"""
from __future__ import annotations

import numpy as np

from pipeline.targets.precisions.base import Codec, PartSpecs, check_fp16_range


class Fp16(Codec):
    name = "fp16"
    summary = "float16 copy (rounding <= 2**-11 of each value)"
    verify_tolerance = 5e-3  # rounding is ~0.05% per element; the rest is float noise of the rerun
    encode_block = 64

    def part_specs(self, shape_tail: tuple[int, ...], channel_basis: bool = False) -> PartSpecs:
        return {"q": (tuple(shape_tail), "float16")}

    def encode(self, x: np.ndarray, view_axes: int, channel_basis=None) -> dict[str, np.ndarray]:
        check_fp16_range(x, "array")
        return {"q": x.astype(np.float16)}

    def decode(self, parts: dict[str, np.ndarray], channel_basis=None) -> np.ndarray:
        return np.asarray(parts["q"]).astype(np.float32)

    def element_bound(self, x: np.ndarray, view_axes: int) -> np.ndarray:
        return np.maximum(np.abs(np.asarray(x, np.float64)) * 2.0**-11, 2.0**-25)

    def decode_torch(self, parts: dict, channel_basis=None):
        return parts["q"].float()

    def encode_torch(self, x, view_axes: int, channel_basis=None) -> dict:
        """`encode` on the teacher's device: torch and numpy both round to nearest even (subnormals
        included), so the bytes are numpy's (tests/test_device_encode.py). On a GPU host the host then
        receives half the bytes and converts nothing (numpy's conversion alone cost 0.28 ms per
        ViT-B relations view)."""
        from pipeline.errors import require_finite

        require_finite(x, "the array to quantize", "a NaN must never be stored as a number")
        check_fp16_range(x, "array")
        return {"q": x.half()}
