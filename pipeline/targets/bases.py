"""The channel bases of a store's q1pct arrays: fitted once, on shard 0, by shard 0's writer.

A q1pct array with `channel_basis` (features [T, D]) predicts each view's codes from the leading
directions of its channels (`pipeline.targets.compact`). Those directions are the store's, not the
view's: a PCA of shard 0's values, kept once as `<name>_channel_basis` int16 [D, k]. Tying the fit
to shard 0 (not to whichever shard is written first) makes the basis, and so every stored byte, a
function of the data alone: a resumed, retried or distributed extraction stores the same bytes.
The writer stores the basis data first and then marks it fitted with the sha256 of its bytes, so
an interrupted fit is refitted and a damaged basis is refused. No other shard may be written
before shard 0 (`hdpipe extract` runs shard 0 first, alone, when the basis is missing).
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import StoreError
from pipeline.targets.schema import part_name

if TYPE_CHECKING:
    from pipeline.targets.store import TargetStore


def digest(a: np.ndarray) -> str:
    """sha256 of an array's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


class ChannelBases:
    """The channel bases of one store handle (read once, then cached)."""

    def __init__(self, store: "TargetStore"):
        self.store = store
        self._cache: dict[str, np.ndarray] = {}

    def needed(self) -> bool:
        """True while some array still waits for shard 0 to fit its channel basis."""
        return any(s.uses_channel_basis and self.get(n) is None for n, s in self.store.arrays.items())

    def get(self, name: str) -> np.ndarray | None:
        """int16 [D, k] channel basis of array `name`; None before shard 0's writer has fitted it."""
        if name in self._cache:
            return self._cache[name]
        if not self.store.arrays[name].uses_channel_basis:
            return None
        arr = self.store._array(part_name(name, "channel_basis"))
        meta = dict(arr.attrs.get("hdpipe", {}))
        if not meta.get("fitted"):
            return None
        basis = np.asarray(arr[...])
        if digest(basis) != meta.get("digest"):
            raise StoreError(f"target store {self.store.url}: the channel basis of {name!r} does not match its "
                             "recorded digest (damaged); re-extract the store with `hdpipe extract --overwrite`")
        self._cache[name] = basis
        return basis

    def fit(self, k: int, name: str, values: np.ndarray) -> np.ndarray:
        """Fit array `name`'s channel basis on shard k's float32 values (k must be 0) and store it."""
        from pipeline.targets import compact, quant

        if isinstance(values, quant.Encoded):  # `device_encode` encodes only arrays whose basis is fitted
            raise StoreError(f"target store {self.store.url}: array {name!r} arrived encoded before its channel "
                             "basis was fitted; shard 0's writer fits it from float32 values")
        if k != 0:
            raise StoreError(
                f"target store {self.store.url}: array {name!r} predicts from a channel basis that shard 0's writer "
                f"fits; shard {k} cannot be written before shard 0 (`hdpipe extract` writes shard 0 first)")
        basis = compact.fit_channel_basis(values)
        arr = self.store._array(part_name(name, "channel_basis"))
        arr[...] = basis
        arr.attrs["hdpipe"] = {**dict(arr.attrs.get("hdpipe", {})), "fitted": True, "digest": digest(basis),
                               "fitted_on_shard": int(k)}
        self._cache[name] = basis
        return basis
