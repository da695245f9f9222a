"""A run's log: `log.jsonl` and `plots/loss.csv` written by rank 0, progress lines on stderr.

log.jsonl holds one JSON row per optimizer step (step, epoch, lr, the loss's meters: `loss` and one
`loss_<term>` per term, images_per_s, elapsed_s) and one `epoch_end` row per epoch (the epoch's averaged
meters). Nothing here names a loss term: plots/loss.csv's columns are the first step row's keys without
the timings (`TIMINGS`), so its header follows the loss. plots/loss.csv holds no timings: it is a pure
function of the run, so a resumed run's equals an uninterrupted one's byte for byte. On resume, rows
after the checkpoint are dropped and redone.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipeline.errors import HdpipeError, storage_error
from pipeline.progress import eta
from pipeline.urls import atomic_write_bytes


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory or fail with a clear error when it cannot be written."""
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise HdpipeError(
            f"run directory {run_dir} is not writable ({e.strerror or e}); choose another --runs-dir or --name"
        ) from None


class RunLog:
    """Rows every `log_every` steps, a stderr line every `print_every` steps (0: epoch ends only)."""

    TIMINGS = ("images_per_s", "elapsed_s")  # in log.jsonl only: they differ between runs of the same thing

    def __init__(self, run_dir: Path, enabled: bool, name: str = "distill", log_every: int = 1,
                 print_every: int = 0, total_steps: int = 0, epochs: int = 0):
        self.jsonl = run_dir / "log.jsonl"
        self.csv = run_dir / "plots" / "loss.csv"
        self.enabled = enabled  # rank 0 only
        self.name, self.log_every, self.print_every = name, log_every, print_every
        self.total_steps, self.epochs = total_steps, epochs
        self.t_start = time.perf_counter()  # `elapsed_s` of each row counts from here (this process)
        self.first_step = 0  # the step this process started from (a resume starts later)
        self.csv_fields: tuple[str, ...] | None = None  # plots/loss.csv's columns: set by the first step row

    def start(self) -> None:
        if self.enabled:
            atomic_write_bytes(str(self.jsonl), b"")
            atomic_write_bytes(str(self.csv), b"")  # the header comes with the first row

    def truncate(self, step: int) -> None:
        """Keep rows of steps <= `step` (those after the checkpoint are redone on resume). Rewritten
        atomically: a full disk here must not lose the rows that are kept."""
        self.first_step = step
        if not self.enabled:
            return
        text = self.jsonl.read_text() if self.jsonl.exists() else ""
        lines = text.splitlines()
        if text and not text.endswith("\n"):
            lines = lines[:-1]  # a row cut short (killed, or the disk filled, mid-append): redone after the checkpoint
        rows = [json.loads(ln) for ln in lines if ln.strip()]
        rows = [r for r in rows
                if r.get("step", 0) <= step and not (r.get("event") == "epoch_end" and r["step"] > step)]
        atomic_write_bytes(str(self.jsonl), "".join(json.dumps(r) + "\n" for r in rows).encode())
        self.csv_fields = None  # the header comes back with the first kept row
        steps = [r for r in rows if "event" not in r]
        atomic_write_bytes(str(self.csv), "".join(self._csv_line(r) + "\n" for r in steps).encode())

    def step(self, row: dict) -> None:
        """An optimizer step's row: written every `log_every` steps, printed every `print_every`."""
        row["elapsed_s"] = round(time.perf_counter() - self.t_start, 4)
        if row["step"] % self.log_every == 0:
            self._write(row)
        if self.print_every and row["step"] % self.print_every == 0:
            self._say(row)

    def epoch_end(self, row: dict) -> None:
        row = {"event": "epoch_end", **row}
        self._write(row)
        self._say(row)

    def _write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._append(self.jsonl, json.dumps(row))
        if "event" not in row:
            self._append(self.csv, self._csv_line(row))

    def _fields(self, row: dict) -> tuple[str, ...]:
        return tuple(k for k in row if k not in self.TIMINGS)

    def _csv_line(self, row: dict) -> str:
        """`row`'s plots/loss.csv line, after the header when it is the first (the header is its keys)."""
        header = self.csv_fields is None
        if header:
            self.csv_fields = self._fields(row)
        elif set(self._fields(row)) != set(self.csv_fields):
            raise ValueError(f"log row keys {self._fields(row)} are not plots/loss.csv's columns {self.csv_fields}")
        line = ",".join(str(row[k]) for k in self.csv_fields)
        return ",".join(self.csv_fields) + "\n" + line if header else line

    @staticmethod
    def _append(path: Path, line: str) -> None:
        try:
            with path.open("a") as f:
                f.write(line + "\n")
        except OSError as e:  # a full disk: one line naming the log, not a traceback
            raise storage_error(e, path, kept="checkpoints/last.pt holds the last good state (use --resume)") or e

    def _say(self, row: dict) -> None:
        """One progress line on stderr: where the run is, its losses, speed and ETA."""
        if not self.enabled:
            return
        done = row["step"] - self.first_step
        rate = done / max(time.perf_counter() - self.t_start, 1e-9)
        left = (self.total_steps - row["step"]) / rate if rate > 0 else None
        what = ("epoch end" if row.get("event") == "epoch_end"
                else f"lr {row['lr']:.3g}, {row['images_per_s']:.1f} img/s")
        terms = ", ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in row.items() if k.startswith("loss_"))
        print(f"{self.name}: epoch {row['epoch'] + 1}/{self.epochs} step {row['step']}/{self.total_steps} "
              f"loss {row['loss']:.4f} ({terms}), {what}, ETA {eta(left)}", file=sys.stderr, flush=True)
