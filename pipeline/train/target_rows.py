"""Stage two's targets from encoded store rows: decode, keep the served layers, cut to the shown tokens.

A loader worker reads each row's view still encoded (fp16 / int8 / q1pct parts) and stacks a whole
piece of rows into the batch under `_enc.<key>.<part>` keys (`encoded_key`), with `_tok` [B, T'] (the positions on
the stored token axis the student sees, when a `tokens: all` store is gathered or tokens are
resampled). `finish_targets` turns those into the float32 targets the loss reads:

    relations / attention  [B, L, H, T', T']   block_features [B, L, T', D]   features [B, T', D]

It is one function for both places it runs, so both give the same values:
- in the worker, on the host (`LoaderConfig.target_transport` "decoded", the CPU default): the
  step's process then receives float32 targets, decoded in parallel by the workers;
- on the training device (`target_transport` "encoded", the CUDA default): the host moves the
  stored bytes only (a q1pct view is ~10x smaller than its float32 targets) and the decode (a few
  integer products and adds) runs on the GPU, where it costs microseconds instead of host
  milliseconds (`pipeline.train.device_copy` calls it after the copy).
A codec without `decode_torch` is decoded by numpy on the host, then moved.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

ENCODED = "_enc."  # batch key prefix of encoded parts: _enc.<key>.<part>
TOKENS = "_tok"  # batch key of the token positions shown, [B, T'] on the stored token axis
TARGETS = "_targets"  # batch key (main process only) of the `DeviceWork` a consumer finishes the batch with
PATCHES, PATCH_IDS = "_patches", "_patch_ids"  # stored student patches [B, K, 3, p, p] and their patch ids [B, K]


@dataclass(frozen=True)
class EncodedArray:
    """One target the batch carries encoded."""

    key: str  # batch key: relations | attention | block_features | features
    store: str  # URL of the store it is read from (its precision and channel basis)
    name: str  # array name in that store
    layer_pos: tuple[int, ...] | None = None  # positions kept on the layer axis (MIM arrays); None: no layer axis


@dataclass(frozen=True)
class DeviceWork:
    """What the training device still does to a batch the loader left encoded (`finish_batch`)."""

    arrays: tuple[EncodedArray, ...]  # targets to decode
    grid: tuple[int, int] | None = None  # patch grid of shipped student patches (None: the batch has its image)


def place_stored_patches(batch: dict, grid: tuple[int, int]) -> dict:
    """The batch with its `image` placed from the stored patches it carries (unchanged without them)."""
    from pipeline.data.patches import place_patches

    if PATCHES not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k not in (PATCHES, PATCH_IDS)}
    out["image"] = place_patches(batch[PATCHES], batch[PATCH_IDS], grid)
    return out


def finish_batch(batch: dict, work: DeviceWork) -> dict:
    """The batch on its device with the student's image placed from its stored patches (a third of
    the image's bytes travelled) and its targets decoded (`finish_targets`)."""
    return finish_targets(place_stored_patches(batch, work.grid), work.arrays)


class StoredRow(NamedTuple):
    """Row `r` of a shard's stored part (`shard_reader.RowViews`, still compressed): decoded only
    when its batch is built, straight into its place (`fill_rows`)."""

    rows: Any
    r: int


def row_spec(values: list) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, numpy dtype) of the batch entry stacking `values` (`StoredRow`s or arrays)."""
    first = values[0]
    if isinstance(first, StoredRow):
        return (len(values),) + tuple(first.rows.row_shape), np.dtype(first.rows.dtype)
    return (len(values),) + tuple(np.shape(first)), np.asarray(first).dtype


def fill_rows(values: list, out: np.ndarray) -> None:
    """out[i] = values[i]: `StoredRow`s decompressed straight into their places (a value is written
    once between the stored bytes and the batch), arrays and numbers copied."""
    for i, v in enumerate(values):
        if isinstance(v, StoredRow):
            v.rows.decode_into(v.r, out[i, ...])  # a view also of 0-d rows
        else:
            out[i, ...] = v


def encoded_key(key: str, part: str) -> str:
    """Batch key of one encoded part of target `key`."""
    return f"{ENCODED}{key}.{part}"


def _store(url: str):
    from pipeline.train.sources import open_store

    return open_store(url)


@functools.lru_cache(maxsize=16)
def _basis_on(url: str, name: str, device: str, pid: int) -> torch.Tensor | None:
    basis = _store(url).bases.get(name)
    return None if basis is None else torch.as_tensor(np.asarray(basis)).to(device)


def decode(array: EncodedArray, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 rows of `array` from its encoded parts, on the parts' device."""
    from pipeline.targets import quant

    spec = _store(array.store).arrays[array.name]
    codec = quant.codec(spec.precision)
    device = next(iter(parts.values())).device
    basis = _basis_on(array.store, array.name, str(device), os.getpid()) if spec.uses_channel_basis else None
    if codec.decode_torch is not None:
        return codec.decode_torch(parts) if basis is None else codec.decode_torch(parts, channel_basis=basis)
    host = {p: v.cpu().numpy() for p, v in parts.items()}
    return torch.from_numpy(quant.decode(host, spec.precision, None if basis is None else basis.cpu().numpy())
                            ).to(device)


def cut_tokens(key: str, x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """Target `key` [B, ...] cut to the token positions tok [B, T'] (attention rows renormalized:
    the softmax restricted to the tokens shown, what a student seeing only them can match)."""
    B, n = tok.shape
    if key in ("relations", "attention"):  # [B, L, H, T, T]
        L, H, T = x.shape[1], x.shape[2], x.shape[-1]
        x = x.gather(3, tok[:, None, None, :, None].expand(B, L, H, n, T))
        x = x.gather(4, tok[:, None, None, None, :].expand(B, L, H, n, n))
        return x / x.sum(dim=-1, keepdim=True) if key == "attention" else x
    if key == "block_features":  # [B, L, T, D]
        return x.gather(2, tok[:, None, :, None].expand(B, x.shape[1], n, x.shape[-1]))
    return x.gather(1, tok[:, :, None].expand(B, n, x.shape[-1]))  # features [B, T, D]


def finish_targets(batch: dict, arrays: tuple[EncodedArray, ...]) -> dict:
    """The batch with its encoded targets decoded to float32 (on the device they are on), the
    served layers kept and the shown tokens cut; `_enc.*`, `_tok` and `_targets` keys removed."""
    out = {k: v for k, v in batch.items() if not k.startswith(ENCODED) and k not in (TOKENS, TARGETS)}
    tok = batch.get(TOKENS)
    for array in arrays:
        prefix = f"{ENCODED}{array.key}."
        parts = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
        if not parts:
            continue
        x = decode(array, parts).float()
        if array.layer_pos is not None and list(array.layer_pos) != list(range(x.shape[1])):
            x = x[:, list(array.layer_pos)]
        if tok is not None:
            x = cut_tokens(array.key, x, tok.to(x.device))
        out[array.key] = x
    return out
