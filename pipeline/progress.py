"""Progress on stderr: a tqdm bar for people at a terminal, plain lines for logs.

With `progress: false` (what `dvc repro` runs) a long stage must still say how it is doing, so
`Progress` then prints one line at most every `every_s` seconds and one at the end: done/total,
rate and ETA. Lines go to stderr, never stdout (commands print their result there).
"""
from __future__ import annotations

import sys
import time


def eta(seconds: float) -> str:
    """H:MM:SS for a number of seconds (--:--:-- when unknown)."""
    if not seconds or seconds != seconds or seconds == float("inf") or seconds < 0:
        return "--:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """`update(n)` as work is done; a bar (`bar=True`) or throttled lines (`bar=False`)."""

    def __init__(self, total: int | None, desc: str, unit: str = "img", bar: bool = True, every_s: float = 30.0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        self._bar = None
        self._note = ""
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                             mininterval=0.5, leave=False)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self._note = note or self._note
        if self._bar is not None:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._line()

    def _line(self) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / dt
        of = f"/{self.total}" if self.total else ""
        left = (self.total - self.done) / rate if self.total and rate > 0 else None
        note = f", {self._note}" if self._note else ""
        print(f"{self.desc}: {self.done}{of} {self.unit} ({rate:.1f} {self.unit}/s, ETA {eta(left)}){note}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.done:
            self._line()
