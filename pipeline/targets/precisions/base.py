"""The interface of a store precision: `Codec`, and checks that several precisions share.

A codec turns a float32 array [*views, *body] (`view_axes` view axes, 2 in a store: [sample,
view]) into named *parts* and back. The store keeps part "q" as `<name>` and every other part as
`<name>_<part>`; readers get float32 back. `pipeline.targets.quant` is the front door: it looks a
codec up in its registry `CODECS`, refuses non-finite input and encodes `encode_block` rows of
axis 0 at a time, so a codec's own `encode` sees finite float32 blocks only.

Adding a precision: a module here with one `Codec` subclass, and one line in `quant.CODECS`.
`tests/test_codecs.py` then checks it like every other (round trip within its stated bound, part
specs, a `verify` tolerance, a real store written, inspected and verified).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from pipeline.errors import StoreError

PartSpecs = dict[str, tuple[tuple[int, ...], str]]  # {part: (shape after the view axes, numpy dtype name)}
FP16_MAX = float(np.finfo(np.float16).max)  # 65504: the largest value fp16 holds


class Codec(ABC):
    """One store precision. Subclasses set the class attributes and the three abstract methods.

    Stated error (what tests check, `within_bound`): `element_bound(x)` bounds |x_hat - x| per
    element, `view_bound` bounds every view's ||x_hat - x||_2 / ||x||_2; a codec states at least one.
    """

    name: ClassVar[str]  # the store's `precision` attribute and the `--precision` value
    summary: ClassVar[str]  # one line for `hdpipe inspect`: what is stored and its error
    # largest per-view relative error `hdpipe verify` accepts: the stored error plus the float noise of a rerun
    verify_tolerance: ClassVar[float]
    encode_block: ClassVar[int] = 64  # rows of axis 0 encoded at once: bounds temporaries on big shards
    # How the store compresses its parts (`schema.codecs`): "fast" (Blosc lz4: every stage-two epoch
    # decompresses every row on the host, so decode speed comes first) or "compact" (zstd: bytes first)
    compression: ClassVar[str] = "fast"
    view_bound: ClassVar[float | None] = None  # hard bound on every view's relative L2 error; None: data-dependent

    @abstractmethod
    def part_specs(self, shape_tail: tuple[int, ...], channel_basis: bool = False) -> PartSpecs:
        """{part: (shape after the view axes, dtype)} that `encode` makes for a body of `shape_tail`.
        `channel_basis`: code the last axis in the store's channel basis (q1pct only; others ignore it)."""

    @abstractmethod
    def encode(self, x: np.ndarray, view_axes: int, channel_basis: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Parts of finite float32 `x` [*views, *body]: `part_specs(body)` prefixed by *views."""

    @abstractmethod
    def decode(self, parts: dict[str, np.ndarray], channel_basis: np.ndarray | None = None) -> np.ndarray:
        """float32 [*views, *body] from the parts `encode` made (any leading selection of them)."""

    def element_bound(self, x: np.ndarray, view_axes: int) -> np.ndarray | None:
        """Largest |x_hat - x| per element (float64, broadcasts to x), or None when only views are bounded."""
        return None

    # `decode` on torch tensors (e.g. on the training device), the same float32 values: a codec that
    # offers it defines `decode_torch(self, parts: dict, channel_basis=None) -> torch.Tensor` (the
    # basis a tensor too); None = host (numpy) only.
    decode_torch = None
    # `encode` on a float32 tensor where it was computed (the teacher's device), the same parts as
    # tensors, byte for byte: `encode_torch(self, x, view_axes, channel_basis=None) -> dict`; None = numpy only.
    encode_torch = None

    def within_bound(self, x: np.ndarray, x_hat: np.ndarray, view_axes: int) -> bool:
        """Whether x_hat = decode(encode(x)) meets the stated bounds (float64 arithmetic)."""
        x64, d = np.asarray(x, np.float64), np.asarray(x_hat, np.float64) - np.asarray(x, np.float64)
        ok = True
        bound = self.element_bound(x, view_axes)
        if bound is not None:
            ok = bool((np.abs(d) <= bound).all())
        if self.view_bound is not None:
            axes = tuple(range(view_axes, x64.ndim))
            err, ref = np.sqrt((d * d).sum(axis=axes)), np.sqrt((x64 * x64).sum(axis=axes))
            ok = ok and bool((err <= self.view_bound * ref).all())
        return ok


def need_rows(shape_tail: tuple[int, ...], precision: str) -> None:
    """Refuse a body without a last axis for precisions that quantize rows."""
    if len(shape_tail) < 1:
        raise StoreError(f"precision {precision!r} quantizes rows (the last axis); a scalar per view has none")


def check_fp16_range(x: np.ndarray, what: str) -> None:
    """Refuse values float16 would turn into inf (`x` a numpy array or a torch tensor). Max and min,
    not abs: no temporary as large as x (4x less CPU than abs then max)."""
    n = x.numel() if hasattr(x, "numel") else np.size(x)
    m = max(float(x.max()), -float(x.min())) if n else 0.0
    if m > FP16_MAX:
        raise StoreError(
            f"{what} reaches |{m:.4g}|, beyond float16's range (65504); store this target with precision "
            "q1pct (float32 step, integer codes), or check the teacher's outputs"
        )
