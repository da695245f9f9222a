"""q1pct on torch tensors, on any device: the parts of `pipeline.targets.compact`, bit for bit.

Extraction encodes where the teacher ran (a GPU: no host copy of float32 targets, no host CPU
spent); the stage-two loader may decode on the training device. Both must give exactly what the
numpy codec gives, so this module performs the very same operations in the same order:

- elementwise IEEE operations (+ - * / sqrt, rounding half to even) are correctly rounded on every
  device, so they agree with numpy's bit for bit;
- products of integer matrices go through float64 matmul only where every partial sum is an
  integer below 2**53 (exact in any order, with or without FMA), else they are split (`imatmul`);
  integer sums are exact in any order;
- float sums use `tree_sum`, the same fixed order as `exact.tree_sum`, never torch's reductions.

The channel basis itself is fitted once per store in numpy (`compact.fit_channel_basis`); here it is
an input. `tests/test_compact_torch.py` checks byte equality with the numpy codec.
"""
from __future__ import annotations

import math

import torch

from pipeline.errors import StoreError, require_finite
from pipeline.targets import compact
from pipeline.targets.compact import (BOUND, CHANNEL_BITS, COEF_COARSE, COEF_SHIFT, DESIGN, ITERATIONS, RANK,
                                      TOKEN_BITS, layout)

_EXACT_F64 = 2.0**53  # integers below this are exact in float64, and so are their sums
_INT64 = 2.0**62  # leave one bit of headroom below int64's limit
_MAX_CODE = 2**24  # as compact._MAX_CODE


# --- exact arithmetic (exact.py's, on tensors) ---------------------------------------------------


def tree_sum(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`exact.tree_sum`: the same elementwise additions in the same order."""
    dim %= a.ndim
    n = a.shape[dim]
    if n == 0:
        return a.sum(dim=dim)  # zeros
    while n > 1:
        h = 1 << ((n - 1).bit_length() - 1)
        if n == 2 * h:
            a = a.narrow(dim, 0, h) + a.narrow(dim, h, h)
        else:
            b = a.narrow(dim, 0, h).clone()
            b.narrow(dim, 0, n - h).add_(a.narrow(dim, h, n - h))
            a = b
        n = h
    return a.select(dim, 0)


def _absmax(a: torch.Tensor) -> float:
    """max |a| as a Python number (one pass, no copy of |a|)."""
    if not a.numel():
        return 0.0
    low, high = torch.aminmax(a)
    return max(-float(low), float(high))


def imatmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int64 a @ b of integer tensors (`exact.imatmul`). Below 2**53 every partial sum is exact
    in float64; above, b is split into high and low halves (CUDA has no int64 matmul), each exact."""
    a, b = a.long(), b.long()
    bound = _absmax(a) * _absmax(b) * max(1, a.shape[-1])
    if bound >= _INT64:
        raise StoreError(f"integer product bound {bound:.3g} exceeds int64; the codes are too large to predict "
                         "exactly (use precision fp16)")
    if bound < _EXACT_F64:
        return (a.double() @ b.double()).long()
    bits = max(1, int(_absmax(b)).bit_length() // 2)
    return imatmul(a, b >> bits) * (1 << bits) + imatmul(a, b & ((1 << bits) - 1))  # b = high * 2**bits + low


def round_shift(x: torch.Tensor, s: int) -> torch.Tensor:
    """rint(x / 2**s), halves up, in int64 (`exact.round_shift`)."""
    x = x.long()
    if s <= 0:
        return x * (1 << -s)
    return (x + (1 << (s - 1))) >> s  # arithmetic shift: floor, as numpy's


def _ceil_log2(top: torch.Tensor) -> torch.Tensor:
    mantissa, exponent = torch.frexp(top)
    return exponent.long() - (mantissa == 0.5).long()


def _orthonormal_columns(y: torch.Tensor) -> torch.Tensor:
    """`exact.orthonormal_columns(y, fill=False)`: Gram-Schmidt, twice per column, dependent columns zero."""
    y = y.double()
    n, r = y.shape[-2:]
    q = torch.zeros_like(y)
    for j in range(r):
        v = y[..., :, j]
        scale = torch.sqrt(tree_sum(v * v))
        prev = q[..., :, :j]
        for _ in range(2):
            v = v - tree_sum(prev * tree_sum(prev * v[..., :, None], -2)[..., None, :])
        norm = torch.sqrt(tree_sum(v * v))
        ok = norm > 1e-9 * torch.clamp(scale, min=1.0)
        q[..., :, j] = torch.where(ok[..., None], v / torch.where(ok, norm, 1.0)[..., None], 0.0)
    return q


def _leading_basis(gram: torch.Tensor, rank: int, iterations: int, start: torch.Tensor) -> torch.Tensor:
    """`exact.leading_basis(gram, rank, iterations, start, fill=False)`."""
    top = gram.abs().amax(dim=(-2, -1), keepdim=True).double()
    shift = torch.where(top > 2.0**20, _ceil_log2(torch.clamp(top, min=1.0)) - 20, 0)
    g = torch.where(shift > 0, (gram + torch.pow(2, torch.clamp(shift - 1, min=0))) >> shift, gram)
    basis = _orthonormal_columns(start[..., :rank])
    for _ in range(iterations):
        basis = _orthonormal_columns(imatmul(g, torch.round(basis * 2.0**20).long()).double())
    return basis


# --- the codec ------------------------------------------------------------------------------------


def zigzag(q: torch.Tensor, dtype: torch.dtype = torch.uint16) -> torch.Tensor:
    """int -> unsigned: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ... (`compact.zigzag`)."""
    return ((q * 2) ^ (q >> 63)).to(dtype)  # bit ops: integer division and where cost ~5x more on a CPU


def unzigzag(z: torch.Tensor) -> torch.Tensor:
    z = z.long()
    return (z >> 1) ^ (z & 1).neg_()


def _per_view(step: torch.Tensor, ndim: int) -> torch.Tensor:
    return step.reshape(step.shape + (1,) * (ndim - step.ndim))


def _view_sum(a: torch.Tensor, view_axes: int) -> torch.Tensor:
    return tree_sum(a.reshape(a.shape[:view_axes] + (-1,)).double())


def _relative_error(x: torch.Tensor, x_hat: torch.Tensor, view_axes: int) -> torch.Tensor:
    d = (x_hat - x).double()
    num = torch.sqrt(_view_sum(d * d, view_axes))
    x64 = x.double()
    den = torch.sqrt(_view_sum(x64 * x64, view_axes))
    inf = torch.where(num > 0, math.inf, 0.0).double()
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), inf)


def _first_step(x: torch.Tensor, view_axes: int, floor: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    rms = torch.sqrt(_view_sum(x64 * x64, view_axes) / max(1, math.prod(x.shape[view_axes:])))
    step = torch.maximum(2.0 * math.sqrt(3.0) * DESIGN * rms, floor)
    return torch.where(step > 0, step, 1.0).float()


def _floor(x: torch.Tensor, view_axes: int) -> torch.Tensor:
    resid = x - (tree_sum(x.double()) / x.shape[-1]).float()[..., None]
    if x.ndim - view_axes >= 2:
        resid = resid - (tree_sum(resid.double(), -2) / x.shape[-2]).float()[..., None, :]
    flat = resid.abs().reshape(x.shape[:view_axes] + (-1,))
    return (flat.amax(dim=-1) if flat.shape[-1] else flat.new_zeros(flat.shape[:-1])).double() / 32000.0


def _codes(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    q = torch.round(x.double() / _per_view(step.double(), x.ndim))
    if _absmax(q) >= _MAX_CODE:
        raise StoreError("q1pct codes exceed 2**24 steps (a view with extreme outliers); use precision fp16")
    return q.long()


def _bounded_step(x: torch.Tensor, view_axes: int, step: torch.Tensor) -> torch.Tensor:
    """`compact._bounded`: shrink the steps of views above BOUND until every view is within it."""
    for _ in range(60):
        err = _relative_error(x, _codes(x, step).float() * _per_view(step, x.ndim), view_axes)
        over = err > BOUND
        if not bool(over.any()):
            return step
        shrink = torch.where(over, 0.97 * BOUND / torch.where(over, err, 1.0), 1.0)
        step = (step.double() * shrink).float()
    raise StoreError("q1pct could not meet its 1% error bound within 60 step reductions; use precision fp16")


def _residual(e: torch.Tensor) -> torch.Tensor:
    if _absmax(e) > 32767:
        raise StoreError("q1pct residual codes overflow uint16 at the step its 1% bound needs; use precision fp16")
    return zigzag(e)


def _rint_mean(q: torch.Tensor, dim: int) -> torch.Tensor:
    # The sum is an exact integer (codes < 2**24): the same float64 mean as numpy's, then rint.
    return torch.round(q.sum(dim=dim).double() / q.shape[dim]).long()


def encode(x: torch.Tensor, view_axes: int, channel_basis: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`compact.encode` on a float32 tensor [*views, *body] (any device): the same parts, as tensors
    on x's device (uint16/uint32 codes, float32 steps). `channel_basis` int16 [D, k]: `channels` layout."""
    if x.dtype != torch.float32:
        raise StoreError(f"q1pct encodes float32 tensors; x is {x.dtype}")
    body = tuple(x.shape[view_axes:])
    if len(body) < 1:
        raise StoreError("precision 'q1pct' quantizes rows (the last axis); a scalar per view has none")
    require_finite(x, "the array to quantize", "a NaN must never be stored as a number")
    kind = layout(body, channel_basis is not None)
    if kind == "channels":
        channel_basis = channel_basis.to(x.device, torch.int64)
        if channel_basis.ndim != 2 or channel_basis.shape[0] != body[-1]:
            raise StoreError(f"channel basis has shape {tuple(channel_basis.shape)}, the array's rows have "
                             f"{body[-1]} channels")
    step = _bounded_step(x, view_axes, _first_step(x, view_axes, _floor(x, view_axes)))
    q = _codes(x, step)
    parts = {"step": step}
    if kind == "channels":
        colmean = _rint_mean(q, -2)
        q = q - colmean[..., None, :]
        coef = round_shift(imatmul(q, channel_basis), CHANNEL_BITS + COEF_COARSE)
        q = q - _channel_predict(coef, channel_basis)
        parts["colmean"], parts["coef"] = zigzag(colmean, torch.uint32), zigzag(coef, torch.uint32)
        parts["q"] = _residual(q)
        return parts
    rowmean = _rint_mean(q, -1)
    q = q - rowmean[..., None]
    parts["rowmean"] = zigzag(rowmean, torch.uint32)
    if len(body) >= 2:
        colmean = _rint_mean(q, -2)
        q = q - colmean[..., None, :]
        parts["colmean"] = zigzag(colmean, torch.uint32)
    if kind == "tokens":
        basis, coef, pred = _token_prediction(q, view_axes)
        q = q - pred
        parts["token_basis"], parts["coef"] = zigzag(basis), zigzag(coef, torch.uint32)
    parts["q"] = _residual(q)
    return parts


def decode(parts: dict[str, torch.Tensor], channel_basis: torch.Tensor | None = None) -> torch.Tensor:
    """float32 x_hat from q1pct parts (tensors on one device): `compact.decode`'s values, bit for bit."""
    q = unzigzag(parts["q"])
    step = parts["step"].float()
    if channel_basis is not None:
        q = q + _channel_predict(unzigzag(parts["coef"]), channel_basis.to(q.device, torch.int64))
    if "token_basis" in parts:
        q = q + _predict(unzigzag(parts["token_basis"]), unzigzag(parts["coef"]), q.shape)
    if "colmean" in parts:
        q = q + unzigzag(parts["colmean"])[..., None, :]
    if "rowmean" in parts:
        q = q + unzigzag(parts["rowmean"])[..., None]
    return q.float() * _per_view(step, q.ndim)


def _token_prediction(m: torch.Tensor, view_axes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`compact._token_prediction`: (U [*views, T, r], C [*views, *lead, r, r], prediction)."""
    views, body = tuple(m.shape[:view_axes]), tuple(m.shape[view_axes:])
    T = body[-1]
    r = min(RANK, T)
    flat = m.reshape((-1, math.prod(body[:-2]), T, T))  # [B, LH, T, T]
    gram = imatmul(flat, flat.transpose(-1, -2)).sum(1) + imatmul(flat.transpose(-1, -2), flat).sum(1)
    order = torch.sort(-torch.diagonal(gram, dim1=-2, dim2=-1), dim=-1, stable=True).indices[:, :r]
    start = torch.take_along_dim(gram, order[:, None, :], dim=-1)
    basis = _leading_basis(gram, r, ITERATIONS, start)
    u = torch.round(basis * 2.0**TOKEN_BITS).long()
    coef = round_shift(imatmul(imatmul(u.transpose(-1, -2)[:, None], flat), u[:, None]), COEF_SHIFT)
    u, coef = u.reshape(views + (T, r)), coef.reshape(views + body[:-2] + (r, r))
    return u, coef, _predict(u, coef, tuple(m.shape))


def _predict(u: torch.Tensor, coef: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    T, r = u.shape[-2:]
    uu = u.reshape((-1, 1, T, r))
    cc = coef.reshape((uu.shape[0], -1, r, r))
    pred = round_shift(imatmul(imatmul(uu, cc), uu.transpose(-1, -2)), 4 * TOKEN_BITS - COEF_SHIFT)
    return pred.reshape(shape)


def _channel_predict(coef: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return round_shift(imatmul(coef, basis.T), CHANNEL_BITS - COEF_COARSE)


assert compact._MAX_CODE == _MAX_CODE  # one limit, two implementations
