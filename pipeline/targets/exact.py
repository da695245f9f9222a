"""Linear algebra on integer codes that gives the same bits on every machine.

The compact precision (`q1pct`, `pipeline.targets.compact`) predicts integer codes with small
integer matrices (a token basis, a channel basis). What a store keeps must be the same bytes for
the same input on any machine, and what a reader rebuilds must equal exactly what the writer
subtracted. Float BLAS promises neither (summation order, FMA contraction and thread count change
the last bits). So:

- `imatmul`: products of integer matrices are exact. When every partial sum is an integer below
  2**53, float64 BLAS is used: each product and each partial sum is then exactly representable, so
  any order, blocking or FMA gives the exact result, fast. Larger bounds use numpy's int64 matmul
  (exact, no BLAS); beyond int64 it refuses.
- `round_shift`: x / 2**s rounded half up, in integer arithmetic.
- `tree_sum`: a float sum in one fixed order (halves added elementwise), so the same bits come out
  of numpy here and of torch on any device (`pipeline.targets.compact_torch` mirrors it). numpy's
  own sums do not promise that: pairwise blocks over the last axis, sequential over others, and a
  GPU reduces in yet another order.
- `orthonormal_columns`: Gram-Schmidt with only elementwise IEEE operations (correctly rounded
  everywhere) and `tree_sum`, never BLAS.
- `leading_basis`: an orthonormal basis whose first columns span the dominant subspace of a
  symmetric integer matrix (orthogonal iteration built from the two above).
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import StoreError

_EXACT_F64 = 2.0**53  # integers below this are exact in float64, and so are their sums
_INT64 = 2.0**62  # leave one bit of headroom below int64's limit


_blas = None


def _one_blas_thread():
    """These products are small and run beside busy cores (loader workers, the teacher's forward):
    OpenBLAS' own threads then spin against them (measured: 15 ms instead of 0.07 ms for a
    [68, 32] x [32, 768] product on a loaded 2-core host). One thread, set around each call."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _absmax(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


def imatmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact int64 product a @ b of integer arrays (numpy matmul broadcasting rules)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    bound = _absmax(a) * _absmax(b) * max(1, a.shape[-1])
    if bound < _EXACT_F64:
        with _one_blas_thread():
            return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    if bound < _INT64:
        return a @ b
    raise StoreError(f"integer product bound {bound:.3g} exceeds int64; the codes are too large to predict exactly "
                     "(use precision fp16)")


def round_shift(x: np.ndarray, s: int) -> np.ndarray:
    """rint(x / 2**s) with halves rounded up, in int64 (exact; s >= 0)."""
    x = np.asarray(x, dtype=np.int64)
    if s <= 0:
        return x << (-s) if s < 0 else x
    return (x + (1 << (s - 1))) >> s


def tree_sum(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sum of `a` along `axis` in a fixed order: with h the largest power of two below the length n,
    elements h..n-1 are added elementwise to elements 0..n-h-1, then halves are added until one
    element is left. Only elementwise IEEE additions, so the bits depend on the values alone
    (`compact_torch.tree_sum` does the very same additions)."""
    a = np.asarray(a)
    axis %= a.ndim
    lead = (slice(None),) * axis
    n = a.shape[axis]
    if n == 0:
        return np.zeros(a.shape[:axis] + a.shape[axis + 1:], a.dtype)
    while n > 1:
        h = 1 << ((n - 1).bit_length() - 1)
        if n == 2 * h:
            a = a[lead + (slice(0, h),)] + a[lead + (slice(h, n),)]
        else:  # the first n-h elements take the last n-h; the rest are carried as they are
            b = a[lead + (slice(0, h),)].copy()
            b[lead + (slice(0, n - h),)] += a[lead + (slice(h, n),)]
            a = b
        n = h
    return a[lead + (0,)]


def ceil_log2(top: np.ndarray) -> np.ndarray:
    """ceil(log2(top)) of positive float64 values, exactly (from the binary exponent, not from a libm
    log2 whose last bit may differ between libraries)."""
    mantissa, exponent = np.frexp(top)
    return exponent.astype(np.int64) - (mantissa == 0.5)


def _dots(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q[..., :, i] . v for every column i: elementwise products, then a reduction over the row axis."""
    return tree_sum(q * v[..., :, None], axis=-2)


def _project_out(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """v minus its components along the (orthonormal) columns of q, twice (classical Gram-Schmidt
    repeated: orthogonal to working precision)."""
    for _ in range(2):
        v = v - tree_sum(q * _dots(q, v)[..., None, :], axis=-1)
    return v


def orthonormal_columns(y: np.ndarray, fill: bool = True) -> np.ndarray:
    """Columns of y [..., n, r] orthonormalized in order (Gram-Schmidt), bit-identical on every
    IEEE machine.

    A column that depends on the earlier ones becomes, with `fill` (2-D y only), the first unit
    vector e_i that does not (the result is then a true basis of r directions); without `fill` it
    becomes zero (fine for a predictor, which only needs some directions, never all).
    """
    y = np.asarray(y, dtype=np.float64)
    n, r = y.shape[-2:]
    if r > n:
        raise ValueError(f"cannot orthonormalize {r} columns of length {n}")
    if fill and y.ndim != 2:
        raise ValueError("fill=True takes one matrix [n, r]")
    q = np.zeros(y.shape, dtype=np.float64)
    spare = iter(range(n))
    for j in range(r):
        v = y[..., :, j]
        scale = np.sqrt(tree_sum(v * v))
        v = _project_out(q[..., :, :j], v)
        norm = np.sqrt(tree_sum(v * v))
        ok = norm > 1e-9 * np.maximum(scale, 1.0)
        if fill:
            while not ok:  # a dependent column: the next unit vector that is not
                v = np.zeros(n)
                v[next(spare)] = 1.0
                v = _project_out(q[:, :j], v)
                norm = np.sqrt(tree_sum(v * v))
                ok = norm > 1e-9
        q[..., :, j] = np.where(ok[..., None], v / np.where(ok, norm, 1.0)[..., None], 0.0)
    return q


def leading_basis(gram: np.ndarray, rank: int, iterations: int = 8, start: np.ndarray | None = None,
                  fill: bool = True) -> np.ndarray:
    """Orthonormal float64 [..., n, rank] basis whose columns approach the top eigenvectors of the
    symmetric integer matrices `gram` [..., n, n] (orthogonal iteration), the same bits everywhere.

    Each product runs on a 2**20 fixed-point copy of the basis and on `gram` rounded to at most
    2**20 (`imatmul`, exact). `start` [..., n, rank] (default: the identity's first columns) is
    orthonormalized first. `fill`: see `orthonormal_columns` (2-D gram only).
    """
    gram = np.asarray(gram, dtype=np.int64)
    n = gram.shape[-1]
    rank = min(rank, n)
    top = np.max(np.abs(gram), axis=(-2, -1), keepdims=True).astype(np.float64)
    shift = np.where(top > 2.0**20, ceil_log2(np.maximum(top, 1.0)) - 20, 0).astype(np.int64)
    # Round half up, per matrix: (x + 2**(s-1)) >> s, and x itself where s is 0.
    g = np.where(shift > 0, (gram + (np.int64(1) << np.maximum(shift - 1, 0))) >> shift, gram)
    basis = np.broadcast_to(np.eye(n, rank), gram.shape[:-2] + (n, rank)) if start is None else start
    basis = orthonormal_columns(basis, fill=fill)
    for _ in range(iterations):
        fixed = np.rint(basis * 2.0**20).astype(np.int64)
        basis = orthonormal_columns(imatmul(g, fixed).astype(np.float64), fill=fill)
    return basis
