"""What produced an output: the code (git commit of this checkout, package version) and the host.

Run folders record `environment()`; done markers of target stores record `code_version()`, so
`hdpipe inspect` can tell which code wrote each shard. (It is not a store attribute: a resumed
extraction after a commit must still match its store's settings.)
"""
from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path

from pipeline import __version__


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`hdpipe <version>+g<commit>[.dirty]` from a git checkout, else `hdpipe <version>`."""
    sha = _git("rev-parse", "--short=12", "HEAD")
    if sha is None:
        return f"hdpipe {__version__}"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return f"hdpipe {__version__}+g{sha}" + (".dirty" if dirty else "")


def environment() -> dict:
    """Versions, command line and host of this process (written beside a run's outputs)."""
    import timm
    import torch

    return {
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "code_version": code_version(),
        "hdpipe": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "command": sys.argv,
        "host": platform.node(),
    }
