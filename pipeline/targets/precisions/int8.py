"""`int8`: per-row absmax int8, the row being the last axis.

`scale = absmax / 127` is stored as float16, rounded *up* so |x / scale| <= 127 and nothing is
clipped; `q = rint(x / scale)`. Per element |x_hat - x| <= scale / 2, so the relative error of a
row is at most sqrt(n) * absmax / (254 * ||row||) (typically 0.5-0.8% for 68-768 wide rows). A
zero row has scale 0 and decodes to exact zeros. Rows with absmax below 127 * 2**-14 (~0.0078) get
subnormal float16 scales: the bound per element still holds, but below absmax ~1e-4 the step is
coarser than absmax/127 (targets of real teachers are orders of magnitude larger).
"""
from __future__ import annotations

import numpy as np

from pipeline.targets.precisions.base import Codec, PartSpecs, check_fp16_range, need_rows


class Int8(Codec):
    name = "int8"
    summary = "int8 codes + a float16 absmax scale per row (error <= half a step of the row)"
    # 0.5-0.8% on typical rows (bounded by sqrt(n)/254 of the row's absmax-to-norm ratio), plus float noise
    verify_tolerance = 2e-2
    encode_block = 64

    def part_specs(self, shape_tail: tuple[int, ...], channel_basis: bool = False) -> PartSpecs:
        shape_tail = tuple(shape_tail)
        need_rows(shape_tail, self.name)
        return {"q": (shape_tail, "int8"), "scale": (shape_tail[:-1], "float16")}

    def encode(self, x: np.ndarray, view_axes: int, channel_basis=None) -> dict[str, np.ndarray]:
        need_rows(x.shape[view_axes:], self.name)
        absmax = np.max(np.abs(x), axis=-1)  # [..., rows]
        check_fp16_range(absmax / 127.0, "int8 row scale")
        scale = (absmax / np.float32(127.0)).astype(np.float16)
        # Round the float16 scale up where it rounded down, so |x / scale| <= 127 and nothing clips.
        low = scale.astype(np.float32) * np.float32(127.0) < absmax
        scale = np.where(low, np.nextafter(scale, np.float16(np.inf)), scale).astype(np.float16)
        s32 = scale.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s32 > 0, np.rint(x / np.where(s32 > 0, s32, 1.0)), 0.0)
        return {"q": np.clip(q, -127, 127).astype(np.int8), "scale": scale}

    def decode(self, parts: dict[str, np.ndarray], channel_basis=None) -> np.ndarray:
        q = np.asarray(parts["q"]).astype(np.float32)
        return q * np.asarray(parts["scale"]).astype(np.float32)[..., None]

    def element_bound(self, x: np.ndarray, view_axes: int) -> np.ndarray:
        # Half the row's scale; the scale exceeds absmax / 127 by at most one float16 ulp (2**-10
        # relative, 2**-24 absolute for subnormal scales); 2**-23 of absmax covers float32 rounding.
        a = np.abs(np.asarray(x, np.float64)).max(axis=-1, keepdims=True)
        return (a / 127 + np.maximum(a / 127 * 2.0**-10, 2.0**-24)) / 2 + a * 2.0**-23

    def decode_torch(self, parts: dict, channel_basis=None):
        return parts["q"].float() * parts["scale"].float().unsqueeze(-1)
