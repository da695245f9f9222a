"""The compact precision `q1pct`: every view within 1% relative error, in as few bytes as we can.

Three steps, all per view (views are independent):

1. One uniform grid for the whole view, step = 2*sqrt(3)*DESIGN*rms(x): rounding noise of rms
   step/sqrt(12) = DESIGN (0.99%) of the view's rms. One step for the whole view is the MSE-optimal
   allocation (equal distortion everywhere), an equal absolute error on every element, which is
   what the SmoothL1 loss weighs. Each view's error is measured on what decode returns; a view
   above 1% gets a smaller step and is redone, so every stored view is within 1% (a hard bound).
2. Integer predictors take the structure out of the codes Q = rint(x / step) (decode adds them back
   exactly, so they change the size, never the error). By layout (`layout`):
   - `tokens` (token-by-token matrices, e.g. relations [L, H, T, T]): the rounded row mean, the
     rounded column mean, then a rank-r prediction U C_h Uᵀ shared by every matrix of the view:
     U [T, r] is the dominant subspace of the view's tokens over all layers and heads (the
     matrices of one view relate the same tokens), C_h = Uᵀ M_h U per matrix. r = RANK.
   - `channels` (token features [T, D] with a channel basis): the rounded per-channel mean over
     tokens, then a prediction from the k = CHANNELS leading directions B [D, k] of the channels
     (a PCA of the store's first shard, stored once in the store): features of a ViT are strongly
     correlated across channels, so a few directions carry most of their energy. (A full D x D
     transform saves ~3% more but costs D*D multiply-adds per token to decode, ~16x more: the
     loader decodes every sample every epoch.)
   - `rows` (anything else): the rounded row mean, then the rounded column mean.
3. Residual codes are zigzag-mapped (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...) to uint16, predictors to
   uint32/uint16; the store byte-shuffles and zstd-compresses them (`schema.codecs`).

Bit-determinism: every number that reaches the store is computed by elementwise IEEE operations,
exact integer products and sums (`pipeline.targets.exact`) and float sums in one fixed order
(`exact.tree_sum`: halves added elementwise, never numpy's or a GPU's own reduction order), so the
same input gives the same bytes on every machine, and in both implementations: this one (numpy) and
`pipeline.targets.compact_torch` (torch, on the teacher's device), which performs the very same
operations. Decode rebuilds exactly the codes encode measured its error on. (Codec version 3, see
`schema.Q1PCT_CODEC`: version 2 summed in numpy's order; its parts decode the same way.)
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.errors import StoreError
from pipeline.targets import exact

BOUND = 0.01  # hard per-view bound on relative error
DESIGN = 0.0099  # relative error the first step is sized for (rounding noise)
RANK = 32  # rank of the shared token-subspace prediction (`tokens` layout)
TOKEN_BITS = 8  # fixed-point bits of the token basis U (|U| <= 2**8)
COEF_SHIFT = 20  # C_h = round(Uᵀ M_h U / 2**COEF_SHIFT): coarse enough to be cheap, fine enough to predict
CHANNELS = 128  # directions of the channel subspace (`channels` layout)
CHANNEL_BITS = 14  # fixed-point bits of the channel basis B (int16)
COEF_COARSE = 4  # channel coefficients are kept on a grid 2**4 coarser than the step (cheap, still predictive)
ITERATIONS = 8  # orthogonal-iteration steps of the token subspace (one view)
BASIS_ITERATIONS = 8  # and of the channel subspace (once per store)
_MAX_CODE = 2**24  # codes beyond this are refused: decode converts sums to float32 exactly below it


def layout(shape_tail: tuple[int, ...], channel_basis: bool) -> str:
    """'channels', 'tokens' or 'rows': which predictor a body of this shape gets."""
    if channel_basis:
        if len(shape_tail) < 2:
            raise StoreError(f"a channel basis needs [tokens, channels] rows; shape {shape_tail} has none")
        return "channels"
    if len(shape_tail) >= 2 and shape_tail[-1] == shape_tail[-2] >= 2:
        return "tokens"
    return "rows"


def part_specs(shape_tail: tuple[int, ...], channel_basis: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """{part: (shape after the view axes, dtype)} that `encode` produces for this body shape."""
    tail = tuple(int(s) for s in shape_tail)
    if len(tail) < 1:
        raise StoreError("precision 'q1pct' quantizes rows (the last axis); a scalar per view has none")
    kind = layout(tail, channel_basis)
    parts = {"q": (tail, "uint16"), "step": ((), "float32")}
    if kind == "channels":
        parts["colmean"] = (tail[:-2] + tail[-1:], "uint32")
        parts["coef"] = (tail[:-1] + (min(CHANNELS, tail[-1]),), "uint32")
        return parts
    parts["rowmean"] = (tail[:-1], "uint32")
    if len(tail) >= 2:
        parts["colmean"] = (tail[:-2] + tail[-1:], "uint32")
    if kind == "tokens":
        r = min(RANK, tail[-1])
        parts["token_basis"] = ((tail[-1], r), "uint16")
        parts["coef"] = (tail[:-2] + (r, r), "uint32")
    return parts


# --- integer helpers -------------------------------------------------------------------------------


def zigzag(q: np.ndarray, dtype=np.uint16) -> np.ndarray:
    """int -> unsigned: 0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ... (small stays small)."""
    q = np.asarray(q, dtype=np.int64)
    return ((q << 1) ^ (q >> 63)).astype(dtype)


def unzigzag(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z).astype(np.int64)
    return (z >> 1) ^ -(z & 1)


def _per_view(step: np.ndarray, ndim: int) -> np.ndarray:
    return step.reshape(step.shape + (1,) * (ndim - step.ndim))


def _rint_mean(q: np.ndarray, axis: int) -> np.ndarray:
    return np.rint(q.mean(axis=axis)).astype(np.int64)


def _view_sum(a: np.ndarray, view_axes: int) -> np.ndarray:
    """float64 sum of each view's elements in `exact.tree_sum`'s fixed order."""
    return exact.tree_sum(a.reshape(a.shape[:view_axes] + (-1,)).astype(np.float64))


def _relative_error(x: np.ndarray, x_hat: np.ndarray, view_axes: int) -> np.ndarray:
    d = (x_hat - x).astype(np.float64)  # float32 difference (exact for nearby values); squares exact in float64
    num = np.sqrt(_view_sum(d * d, view_axes))
    x64 = x.astype(np.float64)
    den = np.sqrt(_view_sum(x64 * x64, view_axes))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))


def _first_step(x: np.ndarray, view_axes: int, floor: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    rms = np.sqrt(_view_sum(x64 * x64, view_axes) / max(1, math.prod(x.shape[view_axes:])))
    step = np.maximum(2.0 * math.sqrt(3.0) * DESIGN * rms, floor)
    return np.where(step > 0, step, 1.0).astype(np.float32)  # an all-zero view: any step, codes 0


def _floor(x: np.ndarray, view_axes: int) -> np.ndarray:
    """The smallest step that keeps residual codes in int16: what is left of each view after its row
    and column means, / 32000 (float64 [*views])."""
    resid = x - (exact.tree_sum(x.astype(np.float64)) / x.shape[-1]).astype(np.float32)[..., None]
    if x.ndim - view_axes >= 2:
        resid -= (exact.tree_sum(resid.astype(np.float64), -2) / x.shape[-2]).astype(np.float32)[..., None, :]
    return np.max(np.abs(resid).reshape(x.shape[:view_axes] + (-1,)), axis=-1, initial=0.0).astype(np.float64) / 32000.0


def _bounded(x: np.ndarray, view_axes: int, step: np.ndarray, attempt) -> tuple[dict, np.ndarray]:
    """Shrink the steps of views above BOUND until every view is within it: (parts, step)."""
    for _ in range(60):
        parts, x_hat = attempt(step)
        err = _relative_error(x, x_hat, view_axes)
        over = err > BOUND
        if not over.any():
            return parts, step
        # Rounding noise scales with the step: shrink the offending views' steps proportionally.
        shrink = np.where(over, 0.97 * BOUND / np.where(over, err, 1.0), 1.0)
        step = (step * shrink).astype(np.float32)
    raise StoreError("q1pct could not meet its 1% error bound within 60 step reductions; use precision fp16")


def _codes(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    q = np.rint(x / _per_view(step.astype(np.float64), x.ndim))
    if np.max(np.abs(q), initial=0) >= _MAX_CODE:
        raise StoreError("q1pct codes exceed 2**24 steps (a view with extreme outliers); use precision fp16")
    return q.astype(np.int64)


def _residual(e: np.ndarray) -> np.ndarray:
    if np.max(np.abs(e), initial=0) > 32767:
        raise StoreError("q1pct residual codes overflow uint16 at the step its 1% bound needs; use precision fp16")
    return zigzag(e)


# --- encode / decode ----------------------------------------------------------------------------


def encode(x: np.ndarray, view_axes: int, channel_basis: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Parts of float32 x [*views, *body] (see `part_specs`); `channel_basis` int16 [D, D] selects
    the `channels` layout."""
    body = x.shape[view_axes:]
    kind = layout(body, channel_basis is not None)
    if kind == "channels":
        channel_basis = np.asarray(channel_basis, dtype=np.int64)
        if channel_basis.ndim != 2 or channel_basis.shape[0] != body[-1]:
            raise StoreError(f"channel basis has shape {channel_basis.shape}, the array's rows have "
                             f"{body[-1]} channels")
    _, step = _bounded(x, view_axes, _first_step(x, view_axes, _floor(x, view_axes)),
                       lambda s: (None, _codes(x, s).astype(np.float32) * _per_view(s, x.ndim)))
    # The error depends only on Q: the predictors are computed once, for the final step.
    q = _codes(x, step)
    parts = {"step": step}
    if kind == "channels":  # per-channel means over tokens, then the channel subspace
        colmean = _rint_mean(q, -2)
        q -= colmean[..., None, :]
        coef, pred = _channel_prediction(q, channel_basis)
        q -= pred
        parts["colmean"], parts["coef"] = zigzag(colmean, np.uint32), zigzag(coef, np.uint32)
        parts["q"] = _residual(q)
        return parts
    rowmean = _rint_mean(q, -1)
    q -= rowmean[..., None]
    parts["rowmean"] = zigzag(rowmean, np.uint32)
    if len(body) >= 2:
        colmean = _rint_mean(q, -2)
        q -= colmean[..., None, :]
        parts["colmean"] = zigzag(colmean, np.uint32)
    if kind == "tokens":
        basis, coef, pred = _token_prediction(q, view_axes)
        q -= pred
        parts["token_basis"], parts["coef"] = zigzag(basis), zigzag(coef, np.uint32)
    parts["q"] = _residual(q)
    return parts


def decode(parts: dict[str, np.ndarray], channel_basis: np.ndarray | None = None) -> np.ndarray:
    """float32 x_hat from the parts `encode` made (any leading selection of views)."""
    q = unzigzag(parts["q"])
    step = np.asarray(parts["step"]).astype(np.float32)
    if channel_basis is not None:
        q += _channel_predict(unzigzag(parts["coef"]), np.asarray(channel_basis, dtype=np.int64))
    if "token_basis" in parts:
        q += _predict(unzigzag(parts["token_basis"]), unzigzag(parts["coef"]), q.shape)
    if "colmean" in parts:
        q += unzigzag(parts["colmean"])[..., None, :]
    if "rowmean" in parts:
        q += unzigzag(parts["rowmean"])[..., None]
    return q.astype(np.float32) * _per_view(step, q.ndim)


# --- tokens: a shared token subspace ----------------------------------------------------------------


def _token_prediction(m: np.ndarray, view_axes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U [*views, T, r], C [*views, *lead, r, r], prediction [*views, *lead, T, T]) of codes m."""
    views, body = m.shape[:view_axes], m.shape[view_axes:]
    T = body[-1]
    r = min(RANK, T)
    flat = m.reshape((-1, int(np.prod(body[:-2], dtype=np.int64)), T, T))  # [B, LH, T, T]
    # Energy of every token direction over all matrices, as rows and as columns.
    gram = exact.imatmul(flat, flat.swapaxes(-1, -2)).sum(1) + exact.imatmul(flat.swapaxes(-1, -2), flat).sum(1)
    # Start from the r tokens with the most energy (ties: lower index first), then iterate.
    order = np.argsort(-np.diagonal(gram, axis1=-2, axis2=-1), axis=-1, kind="stable")[:, :r]
    start = np.take_along_axis(gram, order[:, None, :], axis=-1).astype(np.float64)
    basis = exact.leading_basis(gram, r, ITERATIONS, start=start, fill=False)  # [B, T, r]
    u = np.rint(basis * 2.0**TOKEN_BITS).astype(np.int64)
    coef = exact.round_shift(exact.imatmul(exact.imatmul(u.swapaxes(-1, -2)[:, None], flat), u[:, None]), COEF_SHIFT)
    pred = _predict(u.reshape(views + (T, r)), coef.reshape(views + body[:-2] + (r, r)), m.shape)
    return u.reshape(views + (T, r)), coef.reshape(views + body[:-2] + (r, r)), pred


def _predict(u: np.ndarray, coef: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """round(U C Uᵀ / 2**(4*TOKEN_BITS - COEF_SHIFT)) for every matrix: int64 `shape`."""
    T, r = u.shape[-2:]
    uu = u.reshape((-1, 1, T, r))  # [views, 1, T, r]
    cc = coef.reshape((uu.shape[0], -1, r, r))  # [views, matrices, r, r]
    pred = exact.round_shift(exact.imatmul(exact.imatmul(uu, cc), uu.swapaxes(-1, -2)), 4 * TOKEN_BITS - COEF_SHIFT)
    return pred.reshape(shape)


# --- channels: a dataset-wide channel subspace ------------------------------------------------------


def fit_channel_basis(x: np.ndarray) -> np.ndarray:
    """int16 [D, k]: the leading k = min(CHANNELS, D) directions of the channels of x [..., D] (a
    PCA of the uncentered second moment), orthonormal, scaled by 2**CHANNEL_BITS; the same bits on
    every machine for the same x.

    The second moment is computed exactly on a 2**-8-of-rms integer grid of x; the directions come
    from orthogonal iteration on it (`exact.leading_basis`).
    """
    rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    rms = float(np.sqrt(exact.tree_sum(rows.astype(np.float64).reshape(-1) ** 2) / rows.size)) if rows.size else 0.0
    grid = np.rint(rows / np.float32(rms / 256.0)).astype(np.int64) if rms > 0 else np.zeros(rows.shape, np.int64)
    gram = exact.imatmul(grid.T, grid)  # [D, D], exact
    basis = exact.leading_basis(gram, min(CHANNELS, gram.shape[0]), BASIS_ITERATIONS, fill=True)
    return np.rint(basis * 2.0**CHANNEL_BITS).astype(np.int16)


def _channel_prediction(m: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients [..., T, k], prediction [..., T, D]) of codes m in the channel subspace."""
    coef = exact.round_shift(exact.imatmul(m, basis), CHANNEL_BITS + COEF_COARSE)
    return coef, _channel_predict(coef, basis)


def _channel_predict(coef: np.ndarray, basis: np.ndarray) -> np.ndarray:
    return exact.round_shift(exact.imatmul(coef, basis.T), CHANNEL_BITS - COEF_COARSE)
