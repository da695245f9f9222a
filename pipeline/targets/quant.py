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
- `q1pct`: error-bounded uniform quantization with predicted codes, the compact mode. Per view:
  1. one uniform grid for the whole view, step = 2*sqrt(3)*0.0096*rms(x): x_hat = rint(x/step)*step
     has rounding noise of rms step/sqrt(12), i.e. 0.96% of the view's rms. One step for the whole
     view is the MSE-optimal allocation (equal distortion everywhere) and means an equal absolute
     error on every element, which is what the SmoothL1 loss weighs;
  2. measure each view's relative error and, for any view above 1%, shrink its step and redo it,
     so every stored view is within 1% relative error of the float32 input (a hard bound);
  3. store the integer codes Q = rint(x/step) as predictors plus residual: the rounded per-row
     mean of Q (last axis), the rounded per-column mean of what is left (second-to-last axis), and
     the residual. Pre-softmax relations q_i.k_j carry much of their energy in the row term
     q_i.mean(k) (softmax ignores it, the SmoothL1 loss does not), features in per-channel offsets:
     the predictors take that out, so the residual codes are small. Decode adds the integers back
     exactly, so the predictors change the size, never the error;
  4. codes are zigzag-mapped (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...): residual uint16, means
     uint32, so small magnitudes have zero high bytes; the store byte-shuffles and zstd-compresses
     them, which is where the size goes down (zstd's entropy stage codes the low bytes).
  The step is float32 [*views]; it is never below max|residual| / 32000, so residual codes fit.

Non-finite inputs are refused (`NonFiniteError`): a NaN must never be stored as a number.
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np

from pipeline.errors import StoreError, require_finite

Precision = Literal["fp16", "int8", "q1pct"]  # lossy float precisions a store may use for float targets
PRECISIONS = get_args(Precision)
LOSSLESS = "exact"  # stored as given (ints, bools, crop boxes); not a quantization

FP16_MAX = float(np.finfo(np.float16).max)  # 65504: the largest value fp16 holds
Q1PCT_BOUND = 0.01  # hard per-view bound on relative error of `q1pct`
Q1PCT_DESIGN = 0.0096  # expected per-view relative error the first step is sized for
_BLOCK = 64  # rows of axis 0 encoded at once: bounds float64 temporaries on big shards


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


def part_specs(shape_tail: tuple[int, ...], precision: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{part: (shape after the view axes, numpy dtype name)} that `encode` produces.

    `shape_tail` is the logical array's shape after its view axes; the store prefixes [N, V].
    """
    shape_tail = tuple(int(s) for s in shape_tail)
    if precision == "fp16":
        return {"q": (shape_tail, "float16")}
    if precision == "int8":
        _need_rows(shape_tail, precision)
        return {"q": (shape_tail, "int8"), "scale": (shape_tail[:-1], "float16")}
    if precision == "q1pct":
        _need_rows(shape_tail, precision)
        parts = {"q": (shape_tail, "uint16"), "step": ((), "float32"), "rowmean": (shape_tail[:-1], "uint32")}
        if len(shape_tail) >= 2:
            parts["colmean"] = (shape_tail[:-2] + shape_tail[-1:], "uint32")
        return parts
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


def encode(x: np.ndarray, precision: str, view_axes: int = 2) -> dict[str, np.ndarray]:
    """Parts for float array `x` in `precision` (see the module docstring for each precision).

    x: float32 [*views, *body] with `view_axes` view axes (2 in a store: [sample, view]).
    Returns {part: array}; shapes and dtypes are `part_specs(body, precision)` prefixed by *views.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < view_axes:
        raise StoreError(f"array of shape {x.shape} has fewer than {view_axes} view axes")
    if precision not in PRECISIONS:
        raise StoreError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    require_finite(x, "the array to quantize", "a NaN must never be stored as a number")
    if view_axes >= 1 and x.shape[0] > _BLOCK:
        # Views are independent: encode a block of rows at a time so temporaries stay small.
        blocks = [_encode_one(x[i : i + _BLOCK], precision, view_axes) for i in range(0, x.shape[0], _BLOCK)]
        return {k: np.concatenate([b[k] for b in blocks], axis=0) for k in blocks[0]}
    return _encode_one(x, precision, view_axes)


def _encode_one(x: np.ndarray, precision: str, view_axes: int) -> dict[str, np.ndarray]:
    if precision == "fp16":
        _check_fp16_range(x, "array")
        return {"q": x.astype(np.float16)}
    if precision == "int8":
        return _encode_int8(x, view_axes)
    return _encode_q1pct(x, view_axes)


def error_stats(x: np.ndarray, parts: dict[str, np.ndarray], precision: str, view_axes: int = 2) -> dict[str, float]:
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
        d = decode(pb, precision) - xb  # float32, see per_view_relative_error
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


def decode(parts: dict[str, np.ndarray], precision: str) -> np.ndarray:
    """float32 array from the parts `encode` made (the same shapes, any leading selection)."""
    if precision == "fp16":
        return np.asarray(parts["q"]).astype(np.float32)
    if precision == "int8":
        q = np.asarray(parts["q"]).astype(np.float32)
        return q * np.asarray(parts["scale"]).astype(np.float32)[..., None]
    if precision == "q1pct":
        return _decode_q1pct(parts)
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


# --- q1pct ---------------------------------------------------------------------------------------


def _zigzag(q: np.ndarray, dtype=np.uint16) -> np.ndarray:
    """int (|q| < 2**30) -> unsigned: 0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ... (small stays small)."""
    q = q.astype(np.int32, copy=False)
    return ((q << 1) ^ (q >> 31)).astype(dtype)


def _unzigzag(z: np.ndarray, dtype=np.int64) -> np.ndarray:
    z = z.astype(dtype)
    return (z >> 1) ^ -(z & 1)


def _view_shape(step: np.ndarray, ndim: int) -> np.ndarray:
    """Step [*views] broadcast against [*views, *body]."""
    return step.reshape(step.shape + (1,) * (ndim - step.ndim))


def _q1pct_parts(x: np.ndarray, step: np.ndarray, two_d: bool) -> dict[str, np.ndarray]:
    """Codes of x on the grid `step` (per view): Q = rint(x / step) = rowmean + colmean + residual.

    The means are integer predictors (rounded means of Q), so decode's sum is Q exactly and the
    error is that of plain uniform rounding; they only make the residual codes small.
    """
    qf = np.rint(x / _view_shape(step.astype(np.float64), x.ndim))  # float64 [*views, *body]
    if np.max(np.abs(qf), initial=0) >= 2**24:
        # Decode sums codes in int32 and converts to float32, exact only below 2**24.
        raise StoreError("q1pct codes exceed 2**24 steps (a view with extreme outliers); use precision fp16")
    q = qf.astype(np.int32)
    del qf
    rowmean = np.rint(q.mean(axis=-1)).astype(np.int32)  # [*views, *body[:-1]]
    resid = q - rowmean[..., None]
    parts = {"rowmean": _zigzag(rowmean, np.uint32)}
    if two_d:
        colmean = np.rint(resid.mean(axis=-2)).astype(np.int32)  # [*views, *body[:-2], body[-1]]
        resid -= colmean[..., None, :]
        parts["colmean"] = _zigzag(colmean, np.uint32)
    if np.max(np.abs(resid), initial=0) > 32767:
        raise StoreError("q1pct residual codes overflow uint16 at the step its 1% bound needs; use precision fp16")
    parts["q"] = _zigzag(resid)
    parts["step"] = step
    return parts


def _encode_q1pct(x: np.ndarray, view_axes: int) -> dict[str, np.ndarray]:
    body = x.shape[view_axes:]
    _need_rows(body, "q1pct")
    body_axes = tuple(range(view_axes, x.ndim))
    two_d = len(body) >= 2
    # Largest residual after removing the means: the step must keep the residual codes in int16.
    resid = x - x.mean(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
    if two_d:
        resid -= resid.mean(axis=-2, keepdims=True, dtype=np.float64).astype(np.float32)
    rmax = np.max(np.abs(resid), axis=body_axes).astype(np.float64) if resid.size else np.zeros(x.shape[:view_axes])
    del resid
    rms = np.sqrt(np.mean(x * x, axis=body_axes, dtype=np.float64))  # [*views]
    step = np.maximum(2.0 * math.sqrt(3.0) * Q1PCT_DESIGN * rms, rmax / 32000.0)
    step = np.where(step > 0, step, 1.0).astype(np.float32)  # an all-zero view: any step, codes 0
    for _ in range(60):
        parts = _q1pct_parts(x, step, two_d)
        # Measure on what decode will really return (float32 arithmetic included).
        err = per_view_relative_error(x, _decode_q1pct(parts), view_axes)
        over = err > Q1PCT_BOUND
        if not over.any():
            return parts
        # Rounding noise scales with the step: shrink the offending views' steps proportionally.
        shrink = np.where(over, 0.95 * Q1PCT_BOUND / np.where(over, err, 1.0), 1.0)
        step = (step * shrink).astype(np.float32)
    raise StoreError("q1pct could not meet its 1% error bound within 60 step reductions; use precision fp16")


def _decode_q1pct(parts: dict[str, np.ndarray]) -> np.ndarray:
    """x_hat = (residual + colmean + rowmean) * step: integer sum (exact), then one float32 product
    (correctly rounded, as a float64 product would be after casting to float32)."""
    # int32 codes (|Q| < 2**24, checked at encode): half the memory of int64 on whole-shard reads.
    q = _unzigzag(np.asarray(parts["q"]), np.int32)
    if "colmean" in parts:
        q += _unzigzag(np.asarray(parts["colmean"])).astype(np.int32)[..., None, :]
    q += _unzigzag(np.asarray(parts["rowmean"])).astype(np.int32)[..., None]
    step = np.asarray(parts["step"]).astype(np.float32)
    return q.astype(np.float32) * _view_shape(step, q.ndim)
