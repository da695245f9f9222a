"""A checkpoint is data, never code: `last.pt` is written with tensors and plain containers only and
read with `torch.load(weights_only=True)`. A planted pickle that would run a shell command on
`hdpipe distill --resume` is refused by name and never runs; a truncated or foreign file is one line;
a normal round trip still restores every RNG exactly."""
from __future__ import annotations

import io
import os
import pickle
import random
import shlex
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import CheckpointError
from pipeline.locks import lock_path
from pipeline.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from test_distill import ENV, _cfg, _hdpipe, _params_file, world  # noqa: F401 - `world` is a fixture
from stages.distill import distill


class Planted:
    """What an attacker leaves at checkpoints/last.pt: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _plant(path: Path, marker: Path, form: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "torch zip":  # torch.save's own format, the payload where the state would be
        torch.save({"model": {}, "rng": [Planted(marker)]}, path)
    else:  # a bare pickle stream
        path.write_bytes(pickle.dumps(Planted(marker)))


def _minimal_state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {"step_count": 1},
            "scaler": None, "state": {"step": 1, "epoch_sums": {"loss": 0.5, "loss_l2": 0.25}, "saved_step": None},
            "rng": [rng_state()], "config": {"name": "t", "relation_layers": [1, 2], "clip_grad": None},
            "world_size": 1}


def test_planted_pickle_really_runs_code_when_trusted(tmp_path):
    """The test's payload is live: the old `weights_only=False` load would have run it."""
    marker = tmp_path / "pwned"
    _plant(tmp_path / "last.pt", marker, "torch zip")
    torch.load(tmp_path / "last.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("form", ["torch zip", "bare pickle"])
def test_planted_pickle_is_refused_by_load_checkpoint(tmp_path, form):
    marker, path = tmp_path / "pwned", tmp_path / "checkpoints" / "last.pt"
    _plant(path, marker, form)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(path))
    msg = str(e.value)
    assert str(path) in msg and "without --resume" in msg and "\n" not in msg
    assert not marker.exists()


def test_planted_pickle_is_refused_by_distill_resume(world, tmp_path):  # noqa: F811 (a fixture)
    """The real resume path, in process and through `hdpipe distill --resume`: refused by name, the
    command never ran, the exit status is 2 with one line, and the run folder's lock is gone."""
    marker = tmp_path / "pwned"
    cfg = _cfg(world, tmp_path, resume=True)
    path = cfg.run_dir / "checkpoints" / "last.pt"
    _plant(path, marker, "torch zip")
    with pytest.raises(CheckpointError, match=str(path)):
        distill(cfg)
    assert not marker.exists() and not os.path.exists(lock_path(str(cfg.run_dir)))

    params = _params_file(world, tmp_path, "t")  # the same run folder, from the command line
    r = subprocess.run(_hdpipe("distill", "--config", str(params), "--resume"), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hdpipe: error: ") and str(path) in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "keys missing", "not a dict", "old format"])
def test_unreadable_checkpoint_is_one_line(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), _minimal_state())
    blob = path.read_bytes()
    if damage == "truncated":  # a copy cut short (the writer itself is atomic)
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "keys missing":
        state = _minimal_state()
        del state["rng"]
        save_checkpoint(str(path), state)
    elif damage == "not a dict":
        save_checkpoint(str(path), [torch.zeros(2)])
    else:  # what hdpipe wrote before: numpy arrays and tuples straight from the RNG getters
        state = _minimal_state()
        state["rng"] = [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}]
        buf = io.BytesIO()
        torch.save(state, buf)
        path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path} is not a checkpoint hdpipe can trust") and "\n" not in msg, msg


def test_missing_checkpoint_is_none(tmp_path):
    assert load_checkpoint(str(tmp_path / "last.pt")) is None


def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), random.getrandbits(64), np.random.rand(3).tolist(),
            np.random.standard_normal(), torch.rand(3).tolist(), torch.randint(0, 1 << 30, (2,)).tolist())


def test_round_trip_restores_every_rng_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second gaussian (gauss_next) in Python's state
    np.random.standard_normal(1)  # and numpy's (has_gauss, cached_gaussian)
    state = _minimal_state()  # rng_state() inside, after the draws above
    saved_py, saved_np = random.getstate(), np.random.get_state()
    save_checkpoint(str(tmp_path / "last.pt"), state)
    expected = _draws()

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ck = load_checkpoint(str(tmp_path / "last.pt"))
    set_rng_state(ck["rng"][0])
    assert random.getstate() == saved_py
    now_np = np.random.get_state()
    assert now_np[0] == saved_np[0] and np.array_equal(now_np[1], saved_np[1]) and now_np[2:] == saved_np[2:]
    assert _draws() == expected
    # everything else comes back too
    assert torch.equal(ck["model"]["weight"], state["model"]["weight"])
    assert ck["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert ck["config"] == state["config"] and ck["state"] == state["state"]


def test_a_real_runs_checkpoint_loads_weights_only(world, tmp_path):  # noqa: F811 (a fixture)
    """What `distill` itself saves (model, AdamW state, schedule, TrainState, config, RNGs) is read by
    the strict loader as it is: no object outside the allow-list sneaks in."""
    cfg = _cfg(world, tmp_path, epochs=1, name="plain")
    distill(cfg)
    path = cfg.run_dir / "checkpoints" / "last.pt"
    with zipfile.ZipFile(path) as z:  # torch's zip format
        assert any(n.endswith("data.pkl") for n in z.namelist())
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["state"]["step"] == 6 and raw["config"]["name"] == "plain"
    assert isinstance(raw["rng"][0]["numpy"]["keys"], torch.Tensor)
    ck = load_checkpoint(str(path))
    set_rng_state(ck["rng"][0])
    distill(replace(cfg, resume=True))  # an already finished run resumes to nothing, cleanly
