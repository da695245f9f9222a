"""Storage precisions for teacher targets: the registry `CODECS` and the functions stores call.

A precision turns one float32 array into named *parts* (`encode`) and back (`decode`); the store
keeps each part as its own Zarr array (`<name>` for part "q", `<name>_<part>` for the others).
The first `view_axes` axes index independent views ([sample, view] in a store); error bounds hold
per view. Relative error is `relative_error(x, x_hat) = ||x_hat - x||_2 / ||x||_2` over the whole
array given (per view when the caller slices one view).

Each precision is a `Codec` (`pipeline.targets.precisions.base`), one module each; the store's
`precision` attribute names one, and `CODECS` is the one list of them: `--precision` choices,
`hdpipe inspect` and `hdpipe verify` (its tolerance) and the tests all read it. Built in:

- `fp16` (`precisions/fp16.py`): float16 copy, rounding <= 2**-11 relative per element; values
  beyond +-65504 are refused, not turned into inf.
- `int8` (`precisions/int8.py`): per-row absmax int8 codes with a float16 scale per row rounded
  up (nothing clips); per element |x_hat - x| <= scale / 2, typically 0.5-0.8% per row.
- `q1pct` (`precisions/q1pct.py`): the compact mode, every view within 1% relative error (a hard
  bound); the codec and its bit-determinism are `pipeline.targets.compact`'s.

A new precision is a module in `pipeline/targets/precisions/` plus one line in `CODECS` below.
Non-finite inputs are refused here, for every codec (`NonFiniteError`): a NaN must never be stored
as a number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import StoreError, require_finite
from pipeline.targets.precisions import fp16, int8, q1pct
from pipeline.targets.precisions.base import Codec, PartSpecs

# The store precisions, by name: one line each.
CODECS: dict[str, Codec] = {codec.name: codec for codec in (
    fp16.Fp16(),
    int8.Int8(),
    q1pct.Q1pct(),
)}
PRECISIONS = tuple(CODECS)  # the built-in names; code that must see added codecs reads CODECS
LOSSLESS = "exact"  # stored as given (ints, bools, crop boxes); not a quantization

_BLOCK = 64  # rows of axis 0 whose error `error_stats` measures at once (bounded float64 temporaries)


def codec(precision: str) -> Codec:
    """The codec of `precision`, or StoreError listing the known ones."""
    try:
        return CODECS[precision]
    except (KeyError, TypeError):
        raise StoreError(f"unknown precision {precision!r}; choose one of {list(CODECS)}") from None


def relative_error(x: np.ndarray, x_hat: np.ndarray) -> float:
    """||x_hat - x||_2 / ||x||_2 over all elements (0.0 when both are zero, inf when only x is)."""
    x64 = np.asarray(x, dtype=np.float64)
    d = np.asarray(x_hat, dtype=np.float64) - x64
    num = float(np.sqrt(np.sum(d * d)))
    den = float(np.sqrt(np.sum(x64 * x64)))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def per_view_relative_error(x: np.ndarray, x_hat: np.ndarray, view_axes: int) -> np.ndarray:
    """relative_error for each view: float64 array of shape x.shape[:view_axes].

    Differences are taken in float32 (exact for nearby values, 2**-24 relative otherwise) and
    squared sums accumulate in float64: as precise as a float64 pass for an error statistic, at a
    fraction of its memory traffic on whole shards.
    """
    axes = tuple(range(view_axes, np.ndim(x)))
    x32 = np.asarray(x, dtype=np.float32)
    d = np.asarray(x_hat, dtype=np.float32) - x32
    num = np.sqrt(np.sum(d * d, axis=axes, dtype=np.float64))
    den = np.sqrt(np.sum(x32 * x32, axis=axes, dtype=np.float64))
    out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))
    return np.asarray(out, dtype=np.float64)


def part_specs(shape_tail: tuple[int, ...], precision: str, channel_basis: bool = False) -> PartSpecs:
    """{part: (shape after the view axes, numpy dtype name)} that `encode` produces.

    `shape_tail` is the logical array's shape after its view axes; the store prefixes [N, V].
    `channel_basis`: q1pct in a channel basis (`compact.layout`); ignored by fp16 and int8.
    """
    return codec(precision).part_specs(tuple(int(s) for s in shape_tail), channel_basis)


def encode(x: np.ndarray, precision: str, view_axes: int = 2,
           channel_basis: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Parts for float array `x` in `precision` (see each codec's module for its parts and bound).

    x: float32 [*views, *body] with `view_axes` view axes (2 in a store: [sample, view]).
    Returns {part: array}; shapes and dtypes are `part_specs(body, precision)` prefixed by *views.
    `channel_basis` int16 [D, D]: q1pct codes the last axis in that basis (`compact.fit_channel_basis`).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < view_axes:
        raise StoreError(f"array of shape {x.shape} has fewer than {view_axes} view axes")
    c = codec(precision)
    require_finite(x, "the array to quantize", "a NaN must never be stored as a number")
    block = c.encode_block
    if view_axes >= 1 and x.shape[0] > block:
        # Views are independent: encode a block of rows at a time so temporaries stay small.
        blocks = [c.encode(x[i : i + block], view_axes, channel_basis) for i in range(0, x.shape[0], block)]
        return {k: np.concatenate([b[k] for b in blocks], axis=0) for k in blocks[0]}
    return c.encode(x, view_axes, channel_basis)


@dataclass(frozen=True)
class Encoded:
    """An array encoded before it reaches the store (on the teacher's device: `pipeline.targets.device_encode`),
    with its error measured where it was encoded."""

    parts: dict[str, np.ndarray]  # {part: [*views, ...]} as `encode` makes them
    err2: np.ndarray  # float64 [*views]: ||decode(parts) - x||² of each view
    ref2: np.ndarray  # float64 [*views]: ||x||² of each view

    def error(self) -> dict[str, float]:
        """What `error_stats` returns for these parts and their input."""
        return _error_summary(self.err2, self.ref2)


def _error_summary(err2: np.ndarray, ref2: np.ndarray) -> dict[str, float]:
    """error_stats' dict from squared error and reference norms per view (float64 arrays)."""
    e2, r2 = np.asarray(err2, np.float64).reshape(-1), np.asarray(ref2, np.float64).reshape(-1)
    pv = np.where(r2 > 0, np.sqrt(e2 / np.where(r2 > 0, r2, 1.0)), np.where(e2 > 0, np.inf, 0.0))
    err_l2, ref_l2 = math.sqrt(float(np.sum(e2))), math.sqrt(float(np.sum(r2)))
    rel = 0.0 if err_l2 == 0.0 else (err_l2 / ref_l2 if ref_l2 > 0 else math.inf)
    return {"relative": rel, "max_view": float(np.max(pv, initial=0.0)), "err_l2": err_l2, "ref_l2": ref_l2}


def error_stats(x: np.ndarray, parts: dict[str, np.ndarray], precision: str, view_axes: int = 2,
                channel_basis: np.ndarray | None = None) -> dict[str, float]:
    """Error of decode(parts) against x, computed a block of rows at a time (bounded memory).

    Returns {"relative": ||x_hat - x|| / ||x||, "max_view": worst per-view relative error,
    "err_l2": ||x_hat - x||, "ref_l2": ||x||} (norms over the whole array, float64).
    """
    err2, ref2 = [], []
    x = np.asarray(x, dtype=np.float32)
    step = _BLOCK if view_axes >= 1 else max(1, len(x))
    for i in range(0, max(1, x.shape[0] if x.ndim else 1), step):
        xb = x[i : i + step] if view_axes >= 1 else x
        pb = {k: (v[i : i + step] if view_axes >= 1 else v) for k, v in parts.items()}
        d = decode(pb, precision, channel_basis) - xb  # float32, see per_view_relative_error
        axes = tuple(range(view_axes, xb.ndim))
        err2.append(np.sum(d * d, axis=axes, dtype=np.float64).reshape(-1))
        ref2.append(np.sum(xb * xb, axis=axes, dtype=np.float64).reshape(-1))
    return _error_summary(np.concatenate(err2), np.concatenate(ref2))


def decode(parts: dict[str, np.ndarray], precision: str, channel_basis: np.ndarray | None = None) -> np.ndarray:
    """float32 array from the parts `encode` made (the same shapes, any leading selection)."""
    return codec(precision).decode(parts, channel_basis)
