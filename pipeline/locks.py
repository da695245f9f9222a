"""One writer per run folder or target store: an advisory lock file beside the folder.

    with writer_lock("runs/hybrid", "run folder"):
        ...  # only this process writes runs/hybrid/

The lock is the file `lock_path(folder)` = `<parent>/<name>.hdpipe-lock` (`runs/hybrid.hdpipe-lock`,
`targets/mae.zarr.hdpipe-lock`), JSON {host, pid, started (ISO 8601, UTC), command}. It lives beside
the folder, not inside it, because:
  - DVC hashes a run folder's outputs and a whole target store: a lock left inside by a crash (or
    present while `dvc status` runs) would change an output's hash; beside, it is in no output;
  - `TargetStore.create` refuses a non-empty folder that is not a store yet, and `overwrite`
    deletes the store's folder, which would delete a lock inside it while it is held;
  - `rm -r` of a finished run or store never has to know about it.
It is taken atomically: on local paths by O_CREAT|O_EXCL; on fsspec URLs by fsspec's exclusive
create (`open(path, "xb")`: a conditional PUT on S3 with s3fs, atomic there). A backend without an
exclusive create falls back to "absent, then write", which two writers starting within the same
moment can both pass: there the lock catches a second run started later, not a simultaneous one.

Advisory: it keeps hdpipe writers apart (a second `hdpipe distill --resume` on one run, two
`hdpipe extract` on one store); it stops nothing else. It is removed when the block ends, normally
or by an exception. A process killed with SIGKILL (or a lost host) leaves it: a lock whose host is
this one and whose pid is no longer alive is stale and taken over, with a warning line on stderr
(a pid reused since by another process keeps it held: the error says to delete the file).
A lock from another host is never judged (its pid means nothing here, and a clock-based age would
break a long run): the error names the holder and says to delete the file when that run is gone.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import posixpath
import socket
import sys
import time
import uuid
from typing import Iterator

from pipeline.errors import LockError
from pipeline.urls import fs_and_path, is_local_fs

SUFFIX = ".hdpipe-lock"
_READ_TRIES = 5  # a lock read empty may be one being written this instant (O_EXCL create, then write)


def lock_path(folder_url: str) -> str:
    """Where the lock of `folder_url` lives: `<parent>/<name>.hdpipe-lock` (local paths absolute);
    inside the folder only when it has no name (a file system or bucket root)."""
    text = str(folder_url).rstrip("/")
    if "://" in text and not text.startswith("file://"):
        proto, rest = text.split("://", 1)
        head, name = posixpath.split(rest)
        return f"{proto}://{posixpath.join(head, name + SUFFIX) if name and head else posixpath.join(rest, SUFFIX)}"
    local = os.path.abspath(text[len("file://"):] if text.startswith("file://") else text)
    head, name = os.path.split(local)
    return os.path.join(head, name + SUFFIX) if name else os.path.join(local, SUFFIX)


@contextlib.contextmanager
def writer_lock(folder_url: str, what: str) -> Iterator[None]:
    """Hold `lock_path(folder_url)` while writing `what` (e.g. "run folder", "target store").

    A second writer gets `LockError` naming the holder (host, pid, started, command) and the lock
    file. A lock left by a dead process of this host is taken over with a warning on stderr. Under
    DDP only rank 0 writes, so only rank 0 takes the lock. The lock is removed on exit, exceptions
    included, and only while it is still this holder's (a lock deleted by hand and retaken by
    another writer is left alone).
    """
    path = lock_path(folder_url)
    fs, fpath = fs_and_path(path)
    mine = _acquire(fs, fpath, path, what)
    try:
        yield
    finally:
        _release(fs, fpath, mine)


def _holder_record() -> bytes:
    return (json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
        "command": " ".join(sys.argv) or sys.executable,
    }, indent=1) + "\n").encode()  # (host, pid, started to the microsecond) tells this holder from any later one


def _acquire(fs, fpath: str, path: str, what: str) -> bytes:
    """Create the lock file holding this process's record; returns the bytes written."""
    record = _holder_record()
    for _ in range(3):  # at most: taken, or a stale lock removed and taken (a racing taker may win)
        if _create_exclusive(fs, fpath, path, record, what):
            return record
        held = _read(fs, fpath)
        if held is None:
            continue  # released between our create and our read: try again
        holder = _parse(held)
        if not _stale(holder):
            raise LockError(_held_message(path, what, holder))
        if _remove_if_unchanged(fs, fpath, held):
            print(f"hdpipe: warning: took over the stale lock {path} of {what} (pid {holder['pid']} on this host "
                  f"{holder['host']} is gone; started {holder.get('started', '?')}: {holder.get('command', '?')})",
                  file=sys.stderr, flush=True)
    raise LockError(f"could not take the lock {path} of {what}: other writers keep taking it; run one writer at a time")


def _create_exclusive(fs, fpath: str, path: str, record: bytes, what: str) -> bool:
    """True when this call created the file; False when it exists."""
    local = is_local_fs(fs)
    try:
        if local:
            os.makedirs(os.path.dirname(fpath), exist_ok=True)
        else:
            fs.makedirs(posixpath.dirname(fpath), exist_ok=True)
        return _create_file(fs, fpath, record, local)
    except FileExistsError:
        if not local or os.path.isdir(os.path.dirname(fpath)):
            return False
        why = "a file is where its folder goes"  # makedirs says "exists" for a file in the way
    except OSError as e:
        why = e.strerror or str(e)
    raise LockError(f"cannot create {path} to lock the {what} ({why}): its folder is not writable or not a "
                    f"folder; choose another location")


def _create_file(fs, fpath: str, record: bytes, local: bool) -> bool:
    if local:
        fd = os.open(fpath, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, record)
            os.fsync(fd)
        except BaseException:  # an empty lock would read as held forever (a full disk, say)
            os.close(fd)
            os.unlink(fpath)
            raise
        os.close(fd)
        return True
    if fs.exists(fpath):
        return False
    try:
        with fs.open(fpath, "xb") as f:
            f.write(record)
    except (NotImplementedError, ValueError):  # no exclusive create here: see the module docstring
        with fs.open(fpath, "wb") as f:
            f.write(record)
    return True


def _read(fs, fpath: str) -> bytes | None:
    """The lock's bytes (None: no lock any more); an empty read is retried a few times (being written)."""
    for attempt in range(_READ_TRIES):
        try:
            with fs.open(fpath, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if data.strip() or attempt == _READ_TRIES - 1:
            return data
        time.sleep(0.05)
    return b""


def _parse(data: bytes) -> dict:
    """The holder's record; an unreadable one is reported as such (never judged stale)."""
    try:
        holder = json.loads(data)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"host": "?", "pid": "?", "started": "?",
                                                    "command": f"unreadable lock record {data[:60]!r}"}


def _stale(holder: dict) -> bool:
    """Same host and the pid is not alive; anything else counts as held."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _held_message(path: str, what: str, holder: dict) -> str:
    host, pid = holder.get("host"), holder.get("pid")
    gone = (f"pid {pid} is not that run any more" if host == socket.gethostname()
            else f"that run is gone (host {host} stopped or crashed)")
    return (f"the {what} is being written by another hdpipe process (host {host}, pid {pid}, "
            f"started {holder.get('started')}, command: {holder.get('command')}); lock file {path}; wait for it "
            f"to finish, or if {gone}, delete {path} and run again")


def _remove_if_unchanged(fs, fpath: str, seen: bytes) -> bool:
    """Remove the lock if it still holds `seen` (a stale record). Locally it is first renamed to a
    unique name, so a fresh lock another taker created meanwhile is put back, not deleted."""
    if not is_local_fs(fs):
        if _read(fs, fpath) == seen:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(fpath)
        return True
    aside = f"{fpath}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(fpath, aside)
    except FileNotFoundError:
        return False  # another taker removed it first
    with open(aside, "rb") as f:
        moved = f.read()
    if moved != seen:  # we moved a live lock taken since our read: put it back unless retaken again
        with contextlib.suppress(FileExistsError):
            os.link(aside, fpath)
    os.unlink(aside)
    return moved == seen


def _release(fs, fpath: str, mine: bytes) -> None:
    """Remove the lock if it is still ours."""
    if _read(fs, fpath) != mine:
        return
    with contextlib.suppress(FileNotFoundError):
        if is_local_fs(fs):
            os.unlink(fpath)
        else:
            fs.rm(fpath)
