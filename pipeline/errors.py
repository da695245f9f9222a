"""Errors a user can act on.

Anything raised as `HdpipeError` is printed by the CLI as one line (no traceback unless `--debug`):
the message must name the file, key or parameter at fault and, where there is one, the command
that fixes it. Everything else is a bug and keeps its traceback.
"""


class HdpipeError(Exception):
    """A problem with the user's input, configuration or environment."""


class ConfigError(HdpipeError):
    """A configuration key is unknown, missing or out of range."""


class ManifestError(HdpipeError):
    """A dataset manifest is malformed or does not match the shards on disk."""


class ShardError(HdpipeError):
    """An input image or tar shard cannot be read or written."""


class StoreError(HdpipeError):
    """A target store is missing, incomplete or was built with other settings."""


class NonFiniteError(HdpipeError):
    """A model produced NaN or Inf; the run stops rather than store or train on it."""


class IntegrityError(ShardError):
    """A tar's bytes differ from the sha256 its manifest records: it must not reach a store or a loss."""


def require_finite(values, what: str, fix: str = "") -> None:
    """Raise NonFiniteError when `values` (a numpy array or torch tensor) holds NaN or Inf.

    The one finiteness check of hdpipe: teacher outputs, store writes, quantization and training
    losses all go through it, so the message always says where and how many. Fast path: the sum of
    the values (NaN and Inf propagate through it) is checked first; only a non-finite sum pays for
    the exact count.
    """
    if type(values).__module__.split(".")[0] == "torch":
        import torch

        if not values.is_floating_point() or bool(torch.isfinite(values.sum())):
            return  # integers are always finite; a finite sum means no NaN/Inf (they propagate)
        bad, total = int((~torch.isfinite(values)).sum()), values.numel()
    else:
        import numpy as np

        values = np.asarray(values)
        if not np.issubdtype(values.dtype, np.inexact):
            return
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is handled below
            if np.isfinite(values.sum()):
                return  # the same fast path: one pass of additions, no boolean copy
        bad, total = int(np.size(values) - np.count_nonzero(np.isfinite(values))), int(np.size(values))
    # Not finite: count exactly (a sum of huge finite values can overflow to Inf, and is not an error).
    if bad:
        raise NonFiniteError(f"{what} holds {bad} non-finite value(s) (NaN/Inf) of {total}" + (f"; {fix}" if fix else ""))
