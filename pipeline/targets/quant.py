"""Storage precisions for teacher targets: how a float32 array becomes the bytes a store keeps.

A precision turns one float32 array into named *parts* (`encode`) and back (`decode`); the store
keeps each part as its own Zarr array (`<name>` for part "q", `<name>_<part>` for the others).
The first `view_axes` axes index independent views ([sample, view] in a store); error bounds hold
per view. Relative error is `relative_error(x, x_hat) = ||x_hat - x||_2 / ||x||_2` over the whole
array given (per view when the caller slices one view).

Precisions (the store's `precision` attribute names one):

- `fp16`: float16 copy. Error is float16 rounding, relative error <= 2**-11 (about 0.05%) for
  values in the float16 normal range; values beyond +-65504 are refused, not turned into inf.
- `int8`: per-row absmax int8, the row being the last axis. `scale = absmax / 127` is stored as
  float16, rounded *up* so |x / scale| <= 127 and nothing is clipped; `q = rint(x / scale)`.
  Per element |x_hat - x| <= scale / 2, so the relative error of a row is at most
  sqrt(n) * absmax / (254 * ||row||) (typically 0.5-0.8% for 68-768 wide rows). A zero row has
  scale 0 and decodes to exact zeros. Rows with absmax below 127 * 2**-14 (~0.0078) get subnormal
  float16 scales: the bound per element still holds, but below absmax ~1e-4 the step is coarser
  than absmax/127 (targets of real teachers are orders of magnitude larger).
- `q1pct`: the compact mode, every view within 1% relative error (a hard bound): one uniform
  grid per view, integer predictors (row/column means, a shared token subspace for token-by-token
  matrices, a dataset-wide channel basis for features), residual codes for zstd. The codec and its
  bit-determinism are `pipeline.targets.compact`'s.

Non-finite inputs are refused (`NonFiniteError`): a NaN must never be stored as a number.
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np

from pipeline.errors import StoreError, require_finite
from pipeline.targets import compact

Precision = Literal["fp16", "int8", "q1pct"]  # lossy float precisions a store may use for float targets
PRECISIONS = get_args(Precision)
LOSSLESS = "exact"  # stored as given (ints, bools, crop boxes); not a quantization

FP16_MAX = float(np.finfo(np.float16).max)  # 65504: the largest value fp16 holds
Q1PCT_BOUND = compact.BOUND  # hard per-view bound on relative error of `q1pct`
_BLOCK = 64  # rows of axis 0 encoded at once: bounds float64 temporaries on big shards
_COMPACT_BLOCK = 8  # the same for q1pct, whose int64 codes and predictions are several copies of a row


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


def part_specs(shape_tail: tuple[int, ...], precision: str,
               channel_basis: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """{part: (shape after the view axes, numpy dtype name)} that `encode` produces.

    `shape_tail` is the logical array's shape after its view axes; the store prefixes [N, V].
    `channel_basis`: q1pct in a channel basis (`compact.layout`); ignored by fp16 and int8.
    """
    shape_tail = tuple(int(s) for s in shape_tail)
    if precision == "fp16":
        return {"q": (shape_tail, "float16")}
    if precision == "int8":
        _need_rows(shape_tail, precision)
        return {"q": (shape_tail, "int8"), "scale": (shape_tail[:-1], "float16")}
    if precision == "q1pct":
        return compact.part_specs(shape_tail, channel_basis)
    raise StoreError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")


def _need_rows(shape_tail: tuple[int, ...], precision: str) -> None:
    if len(shape_tail) < 1:
        raise StoreError(f"precision {precision!r} quantizes rows (the last axis); a scalar per view has none")


def _check_fp16_range(x: np.ndarray, what: str) -> None:
    m = float(np.max(np.abs(x))) if x.size else 0.0
    if m > FP16_MAX:
        raise StoreError(
            f"{what} reaches |{m:.4g}|, beyond float16's range (65504); store this target with precision "
            "q1pct (float32 step, integer codes), or check the teacher's outputs"
        )


def encode(x: np.ndarray, precision: str, view_axes: int = 2,
           channel_basis: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Parts for float array `x` in `precision` (see the module docstring for each precision).

    x: float32 [*views, *body] with `view_axes` view axes (2 in a store: [sample, view]).
    Returns {part: array}; shapes and dtypes are `part_specs(body, precision)` prefixed by *views.
    `channel_basis` int16 [D, D]: q1pct codes the last axis in that basis (`compact.fit_channel_basis`).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < view_axes:
        raise StoreError(f"array of shape {x.shape} has fewer than {view_axes} view axes")
    if precision not in PRECISIONS:
        raise StoreError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    require_finite(x, "the array to quantize", "a NaN must never be stored as a number")
    block = _COMPACT_BLOCK if precision == "q1pct" else _BLOCK
    if view_axes >= 1 and x.shape[0] > block:
        # Views are independent: encode a block of rows at a time so temporaries stay small.
        blocks = [_encode_one(x[i : i + block], precision, view_axes, channel_basis)
                  for i in range(0, x.shape[0], block)]
        return {k: np.concatenate([b[k] for b in blocks], axis=0) for k in blocks[0]}
    return _encode_one(x, precision, view_axes, channel_basis)


def _encode_one(x: np.ndarray, precision: str, view_axes: int, channel_basis) -> dict[str, np.ndarray]:
    if precision == "fp16":
        _check_fp16_range(x, "array")
        return {"q": x.astype(np.float16)}
    if precision == "int8":
        return _encode_int8(x, view_axes)
    _need_rows(x.shape[view_axes:], precision)
    return compact.encode(x, view_axes, channel_basis)


def error_stats(x: np.ndarray, parts: dict[str, np.ndarray], precision: str, view_axes: int = 2,
                channel_basis: np.ndarray | None = None) -> dict[str, float]:
    """Error of decode(parts) against x, computed a block of rows at a time (bounded memory).

    Returns {"relative": ||x_hat - x|| / ||x||, "max_view": worst per-view relative error,
    "err_l2": ||x_hat - x||, "ref_l2": ||x||} (norms over the whole array, float64).
    """
    err2 = ref2 = 0.0
    worst = 0.0
    x = np.asarray(x, dtype=np.float32)
    step = _BLOCK if view_axes >= 1 else max(1, len(x))
    for i in range(0, max(1, x.shape[0] if x.ndim else 1), step):
        xb = x[i : i + step] if view_axes >= 1 else x
        pb = {k: (v[i : i + step] if view_axes >= 1 else v) for k, v in parts.items()}
        d = decode(pb, precision, channel_basis) - xb  # float32, see per_view_relative_error
        axes = tuple(range(view_axes, xb.ndim))
        e2 = np.sum(d * d, axis=axes, dtype=np.float64)
        r2 = np.sum(xb * xb, axis=axes, dtype=np.float64)
        err2 += float(np.sum(e2))
        ref2 += float(np.sum(r2))
        pv = np.where(r2 > 0, np.sqrt(e2 / np.where(r2 > 0, r2, 1.0)), np.where(e2 > 0, np.inf, 0.0))
        worst = max(worst, float(np.max(pv)) if np.size(pv) else 0.0)
    err_l2, ref_l2 = math.sqrt(err2), math.sqrt(ref2)
    rel = 0.0 if err_l2 == 0.0 else (err_l2 / ref_l2 if ref_l2 > 0 else math.inf)
    return {"relative": rel, "max_view": worst, "err_l2": err_l2, "ref_l2": ref_l2}


def decode(parts: dict[str, np.ndarray], precision: str, channel_basis: np.ndarray | None = None) -> np.ndarray:
    """float32 array from the parts `encode` made (the same shapes, any leading selection)."""
    if precision == "fp16":
        return np.asarray(parts["q"]).astype(np.float32)
    if precision == "int8":
        q = np.asarray(parts["q"]).astype(np.float32)
        return q * np.asarray(parts["scale"]).astype(np.float32)[..., None]
    if precision == "q1pct":
        return compact.decode(parts, channel_basis)
    raise StoreError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")


# --- int8 ----------------------------------------------------------------------------------------


def _encode_int8(x: np.ndarray, view_axes: int) -> dict[str, np.ndarray]:
    _need_rows(x.shape[view_axes:], "int8")
    absmax = np.max(np.abs(x), axis=-1)  # [..., rows]
    _check_fp16_range(absmax / 127.0, "int8 row scale")
    scale = (absmax / np.float32(127.0)).astype(np.float16)
    # Round the float16 scale up where it rounded down, so |x / scale| <= 127 and nothing clips.
    low = scale.astype(np.float32) * np.float32(127.0) < absmax
    scale = np.where(low, np.nextafter(scale, np.float16(np.inf)), scale).astype(np.float16)
    s32 = scale.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint(x / np.where(s32 > 0, s32, 1.0)), 0.0)
    return {"q": np.clip(q, -127, 127).astype(np.int8), "scale": scale}
