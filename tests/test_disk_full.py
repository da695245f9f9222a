"""A full disk (ENOSPC, EDQUOT, EROFS) is the user's to fix: every write stops with one line naming
the file, the previous file stays as it was and no temporary file is left behind; a resumed run
then continues from the last good checkpoint."""
from __future__ import annotations

import builtins
import errno
import json
from dataclasses import replace
from pathlib import Path

import pytest

import pipeline.urls as urls
from pipeline.cli import main
from pipeline.errors import HdpipeError, WriteError
from pipeline.locks import lock_path
from pipeline.train.checkpoint import load_checkpoint
from test_distill import _cfg, _steps, world  # noqa: F401 - `world` is a fixture
from stages.distill import distill


class FillingFile:
    """A file whose disk fills after `room` bytes: what fits is written, then ENOSPC."""

    def __init__(self, f, room: int, code: int):
        self.f, self.room, self.code = f, room, code

    def write(self, data: bytes) -> int:
        self.f.write(data[: self.room])
        if len(data) > self.room:
            raise OSError(self.code, "No space left on device" if self.code == errno.ENOSPC else "refused")
        return len(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk(monkeypatch, when=lambda path: True, room: int = 1000, code: int = errno.ENOSPC) -> None:
    """`pipeline.urls` writes through a disk that fills after `room` bytes, for paths `when` picks."""
    def opener(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        return FillingFile(f, room, code) if "w" in mode and when(str(path)) else f

    monkeypatch.setattr(urls, "open", opener, raising=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_tmp(tmp_path, monkeypatch, code):
    target = tmp_path / "ck" / "last.pt"
    urls.atomic_write_bytes(str(target), b"old checkpoint")
    fill_disk(monkeypatch, code=code)
    with pytest.raises(WriteError) as e:
        urls.atomic_write_bytes(str(target), b"x" * 3_000_000)
    msg = str(e.value)
    assert isinstance(e.value, HdpipeError) and "\n" not in msg
    assert msg.startswith(f"cannot write {target}: ") and errno.errorcode[code] in msg and "unchanged" in msg
    assert target.read_bytes() == b"old checkpoint"
    assert _leftovers(tmp_path) == []


def test_any_failed_write_leaves_no_tmp(tmp_path, monkeypatch):
    """Not a storage error (EIO, a bug): still no temporary file, and the OSError itself goes on."""
    target = tmp_path / "f.json"
    urls.atomic_write_bytes(str(target), b"{}")
    fill_disk(monkeypatch, code=errno.EIO)
    with pytest.raises(OSError) as e:
        urls.atomic_write_bytes(str(target), b"x" * 5000)
    assert e.value.errno == errno.EIO and not isinstance(e.value, HdpipeError)
    assert target.read_bytes() == b"{}" and _leftovers(tmp_path) == []


def test_run_log_append_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    from pipeline.train.runlog import RunLog

    log = RunLog(tmp_path, True)
    (tmp_path / "plots").mkdir()
    log.start()
    real_open = Path.open

    def full(self, mode="r", *a, **k):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *a, **k)

    monkeypatch.setattr(Path, "open", full)
    row = {"step": 1, "epoch": 0, "lr": 0.1, "loss": 1.0, "loss_features": 0.5, "loss_relations": 0.5,
           "images_per_s": 1.0}
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'log.jsonl'}: No space left.*--resume"):
        log.step(row)


def test_run_log_truncate_drops_a_row_cut_short(tmp_path):
    """A disk that filled (or a kill) mid-append leaves a partial last row; the resume drops it."""
    from pipeline.train.runlog import RunLog

    (tmp_path / "plots").mkdir()
    rows = [{"step": s, "epoch": 0, "lr": 0.1, "loss": 1.0, "loss_features": 0.5, "loss_relations": 0.5}
            for s in (1, 2)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "ep')
    RunLog(tmp_path, True).truncate(2)
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "plots" / "loss.csv").read_text().splitlines()[1:] == ["1,0,0.1,1.0,0.5,0.5",
                                                                              "2,0,0.1,1.0,0.5,0.5"]


@pytest.mark.parametrize("filename", [None, "runs/x/metrics.json"])
def test_cli_prints_one_line_for_a_full_disk(capsys, monkeypatch, filename):
    """Wherever a command meets a full disk, `hdpipe` says so in one line (status 2); --debug raises."""
    import stages.distill

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", *([filename] if filename else []))

    monkeypatch.setattr(stages.distill, "distill", full)
    assert main(["distill", "--name", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hdpipe: error: cannot write ") and "ENOSPC" in err[0]
    assert (filename or "a file") in err[0]
    with pytest.raises(OSError):
        main(["--debug", "distill", "--name", "x"])


def test_cli_keeps_tracebacks_for_other_os_errors(monkeypatch):
    import stages.distill

    def broken(cfg):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(stages.distill, "distill", broken)
    with pytest.raises(OSError):
        main(["distill", "--name", "x"])


def test_full_disk_during_a_checkpoint_then_resume(world, tmp_path, monkeypatch):  # noqa: F811
    """The disk fills while the step-4 checkpoint is written: the run stops with one line naming
    last.pt, the step-2 checkpoint is intact, nothing half-written and no lock stays; after space is
    freed, --resume finishes with each step logged once."""
    cfg = _cfg(world, tmp_path, epochs=1)
    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    calls = {"n": 0}

    def second_checkpoint(path: str) -> bool:
        calls["n"] += path.startswith(str(ckpt) + ".tmp-")
        return path.startswith(str(ckpt) + ".tmp-") and calls["n"] == 2

    fill_disk(monkeypatch, when=second_checkpoint, room=100_000)
    with pytest.raises(WriteError, match=rf"^cannot write {ckpt}: No space left on device \(ENOSPC\)"):
        distill(cfg)
    assert load_checkpoint(str(ckpt))["state"]["step"] == 2
    assert _leftovers(cfg.run_dir) == [] and not Path(lock_path(str(cfg.run_dir))).exists()

    monkeypatch.undo()
    distill(replace(cfg, resume=True))
    assert [r["step"] for r in _steps(cfg.run_dir)] == [1, 2, 3, 4, 5, 6]
    assert len((cfg.run_dir / "plots" / "loss.csv").read_text().splitlines()) == 1 + 6
