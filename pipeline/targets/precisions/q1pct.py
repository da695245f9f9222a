"""`q1pct`: the compact precision, every view within 1% relative error (a hard bound).

One uniform grid per view, integer predictors (row/column means, a shared token subspace for
token-by-token matrices, a dataset-wide channel basis for features), residual codes for zstd. The
codec, its parts and its bit-determinism are `pipeline.targets.compact`'s (with `exact.py` and, for
the channel basis, `bases.py`), and in torch `compact_torch`'s (the same bytes, on any device); this
module only presents it as a `Codec`.
"""
from __future__ import annotations

import numpy as np

from pipeline.targets import compact
from pipeline.targets.precisions.base import Codec, PartSpecs, need_rows


class Q1pct(Codec):
    name = "q1pct"
    summary = "one grid per view + integer predictors, zstd (every view within 1% relative error)"
    verify_tolerance = 1.2e-2  # bounded at 1% per view by construction, plus float noise
    encode_block = 8  # its int64 codes and predictions are several copies of a row
    compression = "compact"  # the precision for bytes: its codes compress ~2x better with zstd than lz4
    view_bound = compact.BOUND

    def part_specs(self, shape_tail: tuple[int, ...], channel_basis: bool = False) -> PartSpecs:
        return compact.part_specs(tuple(shape_tail), channel_basis)

    def encode(self, x: np.ndarray, view_axes: int, channel_basis=None) -> dict[str, np.ndarray]:
        need_rows(x.shape[view_axes:], self.name)
        return compact.encode(x, view_axes, channel_basis)

    def decode(self, parts: dict[str, np.ndarray], channel_basis=None) -> np.ndarray:
        return compact.decode(parts, channel_basis)

    def encode_torch(self, x, view_axes: int, channel_basis=None) -> dict:
        from pipeline.targets import compact_torch

        return compact_torch.encode(x, view_axes, channel_basis)

    def decode_torch(self, parts: dict, channel_basis=None):
        from pipeline.targets import compact_torch

        return compact_torch.decode(parts, channel_basis)
