"""One writer per run folder or target store (`pipeline.locks.writer_lock`): the lock file beside the
folder names its holder, a second writer is refused with that name, a dead pid of this host is taken
over, the lock goes away after a run and after an exception; `hdpipe distill --resume` twice on one
run folder leaves its logs without a duplicated row."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, HdpipeError, LockError
from pipeline.locks import lock_path, writer_lock
from pipeline.train.distributed import Dist, main_rank_lock
from test_distill import ENV, _cfg, _hdpipe, _log, _params_file, world  # noqa: F401 - `world` is a fixture
from stages.distill import distill


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(folder: Path, **record) -> Path:
    path = Path(lock_path(str(folder)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "2024-01-01T00:00:00",
                                "command": "hdpipe distill --resume"} | record))
    return path


@pytest.mark.parametrize("folder, lock", [
    ("runs/hybrid", "runs/hybrid.hdpipe-lock"),
    ("runs/hybrid/", "runs/hybrid.hdpipe-lock"),
    ("s3://bucket/targets/mae.zarr", "s3://bucket/targets/mae.zarr.hdpipe-lock"),
    ("s3://bucket", "s3://bucket/.hdpipe-lock"),  # a bucket root has no beside
])
def test_lock_lives_beside_the_folder(folder, lock):
    got = lock_path(folder)
    assert got == (lock if "://" in lock else os.path.abspath(lock))


def test_lock_names_its_holder_and_goes_away(tmp_path):
    folder = tmp_path / "run"
    path = Path(lock_path(str(folder)))
    with writer_lock(str(folder), "run folder"):
        record = json.loads(path.read_text())
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["started"] and record["command"]
        assert not folder.exists()  # beside the folder: nothing is created inside it
    assert not path.exists()


def test_second_writer_is_refused_by_name(tmp_path):
    folder = tmp_path / "store.zarr"
    with writer_lock(str(folder), "target store"):
        record = json.loads(Path(lock_path(str(folder))).read_text())
        with pytest.raises(LockError) as e:
            with writer_lock(str(folder), "target store"):
                pytest.fail("two writers")
        msg = str(e.value)
        assert isinstance(e.value, HdpipeError) and "\n" not in msg
        for part in ("the target store is being written", f"host {record['host']}", f"pid {record['pid']}",
                     record["started"], record["command"], lock_path(str(folder))):
            assert part in msg, (part, msg)
    assert not Path(lock_path(str(folder))).exists()  # the refused writer removed nothing; the holder did


def test_racing_writers_one_wins(tmp_path):
    """Four processes try at the same instant, a stale lock of a dead pid in their way: one holds."""
    folder, go = tmp_path / "run", tmp_path / "go"
    _plant(folder, pid=_dead_pid())
    code = ("import os, sys, time\nfrom pipeline.locks import writer_lock\nfrom pipeline.errors import LockError\n"
            "print('ready', flush=True)\nwhile not os.path.exists(sys.argv[2]):\n    time.sleep(0.001)\n"
            "try:\n    with writer_lock(sys.argv[1], 'run folder'):\n        time.sleep(1.0)\n"
            "    print('held')\nexcept LockError:\n    print('refused')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]) for _ in range(4)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4  # all imported, waiting
    go.touch()
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["held", "refused", "refused", "refused"], outs
    assert not Path(lock_path(str(folder))).exists()


def test_lock_is_removed_after_an_exception(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with writer_lock(str(tmp_path / "run"), "run folder"):
            1 / 0
    assert not Path(lock_path(str(tmp_path / "run"))).exists()


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    pid = _dead_pid()
    path = _plant(folder, pid=pid)
    with writer_lock(str(folder), "run folder"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"took over the stale lock {path}" in err and f"pid {pid}" in err and len(err.strip().splitlines()) == 1
    assert not path.exists()


@pytest.mark.parametrize("record, says", [
    ({"host": "gpu-node-7", "pid": 1}, "if that run is gone (host gpu-node-7 stopped or crashed), delete"),
    ({"pid": "?"}, "delete"),
])
def test_lock_of_another_host_or_unreadable_is_never_guessed_at(tmp_path, record, says):
    folder = tmp_path / "run"
    path = _plant(folder, **record)
    with pytest.raises(LockError, match="delete") as e:
        with writer_lock(str(folder), "run folder"):
            pytest.fail("took a live lock")
    assert says in str(e.value) and str(path) in str(e.value)
    assert path.exists()  # left for its owner (or the user) to remove


def test_garbage_lock_file_is_refused(tmp_path):
    folder = tmp_path / "run"
    path = Path(lock_path(str(folder)))
    path.write_bytes(b"\x00\x01not json")
    with pytest.raises(LockError, match="unreadable lock record"):
        with writer_lock(str(folder), "run folder"):
            pass


def test_unwritable_place_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LockError, match="not writable"):
        with writer_lock(str(blocker / "run"), "run folder"):
            pass


def test_full_disk_while_locking_leaves_no_empty_lock(tmp_path, monkeypatch):
    import errno

    import pipeline.locks as locks

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks.os, "fsync", full)
    with pytest.raises(LockError, match="No space left on device"):
        with writer_lock(str(tmp_path / "run"), "run folder"):
            pass
    assert not Path(lock_path(str(tmp_path / "run"))).exists()


def test_fsspec_url_lock(tmp_path):
    """On an fsspec URL the lock is created with the file system's exclusive create."""
    folder = f"memory://locks-{os.getpid()}/targets/mae.zarr"
    import fsspec

    fs = fsspec.filesystem("memory")
    with writer_lock(folder, "target store"):
        assert fs.exists(lock_path(folder))
        with pytest.raises(LockError, match=f"lock file {lock_path(folder)}"):
            with writer_lock(folder, "target store"):
                pass
    assert not fs.exists(lock_path(folder))


def test_only_rank_zero_takes_the_run_folder_lock(tmp_path):
    folder = tmp_path / "run"
    with main_rank_lock(Dist(rank=1, world_size=1), folder, "run folder"):
        assert not Path(lock_path(str(folder))).exists()
    with main_rank_lock(Dist(), folder, "run folder"):
        assert Path(lock_path(str(folder))).exists()
    assert not Path(lock_path(str(folder))).exists()


# ----------------------------------------------------------------------------- distill
def test_distill_holds_the_lock_and_removes_it(world, tmp_path):  # noqa: F811
    """A normal run and a run that stops with an error both leave no lock; the lock never enters the
    run folder (DVC hashes its outputs)."""
    cfg = _cfg(world, tmp_path, epochs=1)
    seen = {}
    import stages.distill as stage

    real = stage.build_run

    def spy(*a, **k):
        seen["locked"] = Path(lock_path(str(cfg.run_dir))).exists()
        return real(*a, **k)

    stage.build_run = spy
    try:
        distill(cfg)
    finally:
        stage.build_run = real
    assert seen["locked"] and not Path(lock_path(str(cfg.run_dir))).exists()
    assert not [p for p in cfg.run_dir.rglob("*") if "lock" in p.name]
    with pytest.raises(ConfigError, match="alpha"):  # an error inside the locked run
        distill(replace(cfg, resume=True, alpha=0.5))
    assert not Path(lock_path(str(cfg.run_dir))).exists()


def test_second_resume_on_one_run_folder_is_refused(world, tmp_path, monkeypatch):  # noqa: F811
    """While one writer holds a run folder, `distill --resume` (in process and from the command line)
    stops before touching it; after release the resume finishes with every step logged once."""
    import pipeline.train.losses as losses

    real, calls = losses.hybrid_loss, {"n": 0}

    def stops_at_step_5(*a, **k):  # an interrupted run: checkpoint at step 4, rows 1..4
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(losses, "hybrid_loss", stops_at_step_5)
    cfg = _cfg(world, tmp_path, epochs=2, name="t")
    with pytest.raises(HdpipeError, match="step 5"):
        distill(cfg)
    monkeypatch.undo()
    run_dir = cfg.run_dir
    before = {p: (run_dir / p).read_bytes() for p in ("log.jsonl", "plots/loss.csv", "checkpoints/last.pt")}

    with writer_lock(str(run_dir), "run folder"):  # another writer, e.g. the first --resume
        with pytest.raises(LockError, match=rf"pid {os.getpid()}.*lock file {lock_path(str(run_dir))}"):
            distill(replace(cfg, resume=True))
        params = _params_file(world, tmp_path, "t")
        r = subprocess.run(_hdpipe("distill", "--config", str(params), "--resume"), env=ENV, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hdpipe: error: the run folder is being written"), r.stderr
        assert f"pid {os.getpid()}" in lines[0] and lock_path(str(run_dir)) in lines[0]
    assert {p: (run_dir / p).read_bytes() for p in before} == before

    distill(replace(cfg, resume=True))
    steps = [row["step"] for row in _log(run_dir) if "event" not in row]
    assert steps == list(range(1, 13))
    csv_steps = [int(line.split(",")[0]) for line in (run_dir / "plots" / "loss.csv").read_text().splitlines()[1:]]
    assert csv_steps == steps
    assert not Path(lock_path(str(run_dir))).exists()


def test_a_second_extraction_of_one_store_is_refused_and_the_store_untouched(tmp_path):
    """Two `hdpipe extract` on one store: the second stops at once naming the holder (the first,
    here this test process), without creating, overwriting or finishing anything."""
    import json as _json

    import numpy as np

    from pipeline.cli import main
    from toydata import structured_jpeg, write_dataset

    rng = np.random.default_rng(0)
    manifest = write_dataset(tmp_path / "data", [structured_jpeg(rng, (72, 90)) for _ in range(8)], 8)
    store = tmp_path / "targets" / "mim.zarr"
    args = ["extract", "--manifest", manifest, "--teacher", "timm:vit_tiny_patch16_224", "--role", "mim",
            "--random-init", "--model-kwargs", _json.dumps({"img_size": 32, "patch_size": 8, "depth": 4}),
            "--out", str(store), "--views", "1", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    with writer_lock(str(store), "target store"):
        for extra in ([], ["--overwrite", "--views", "2"]):
            with pytest.raises(LockError, match=f"pid {os.getpid()}"):
                from stages.extract import ExtractConfig, extract

                extract(ExtractConfig(manifest=manifest, teacher="timm:vit_tiny_patch16_224", role="mim",
                                      random_init=True, model_kwargs={"img_size": 32, "patch_size": 8, "depth": 4},
                                      out=str(store), views=2 if extra else 1, overwrite=bool(extra), device="cpu",
                                      progress=False))
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    assert not os.path.exists(lock_path(str(store)))
