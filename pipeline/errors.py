"""Errors a user can act on.

Anything raised as `HdpipeError` is printed by the CLI as one line (no traceback unless `--debug`):
the message must name the file, key or parameter at fault and, where there is one, the command
that fixes it. Everything else is a bug and keeps its traceback.
"""
import errno


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
    """Bytes differ from what their writer recorded (a tar vs its manifest's sha256, a target shard vs
    its crc32c and done marker): they must not reach a store or a loss."""


class ShardDamagedError(IntegrityError, StoreError):
    """A finished target shard whose files are missing, of the wrong length or fail their crc32c."""

    def __init__(self, message: str, *, store: str, shard: int, array: str, why: str):
        super().__init__(message)
        self.store, self.shard, self.array, self.why = store, shard, array, why


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
        raise NonFiniteError(f"{what} holds {bad} non-finite value(s) (NaN/Inf) of {total}"
                             + (f"; {fix}" if fix else ""))


class CheckpointError(HdpipeError):
    """A training checkpoint cannot be trusted or read (not the tensors-only format, truncated, corrupt)."""


class WriteError(HdpipeError):
    """A file could not be written because its storage is full, over quota or read-only."""


class LockError(HdpipeError):
    """Another writer holds (or held, and left behind) the lock of a run folder or target store."""


# errno values that mean "this storage refuses writes" (not a bug): full, over quota, file too big, read-only.
STORAGE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS") if hasattr(errno, n))


def storage_error(err: BaseException, target: object = None, kept: str = "") -> "WriteError | None":
    """The one-line WriteError for an OSError saying the storage refuses writes, else None.

    `target` names the file being written: an OSError raised by `write()` carries no file name.
    `kept` says what survived (e.g. "the previous file is unchanged")."""
    if not isinstance(err, OSError) or err.errno not in STORAGE_ERRNOS:
        return None
    name = target if target is not None else (err.filename or "a file")
    code = errno.errorcode.get(err.errno, str(err.errno))
    fix = ("write elsewhere (that file system is read-only)" if code == "EROFS"
           else "free space (or quota) on that file system, or write elsewhere")
    return WriteError(f"cannot write {name}: {err.strerror or code} ({code})" + (f"; {kept}" if kept else "")
                      + f"; {fix}, and run the command again")
