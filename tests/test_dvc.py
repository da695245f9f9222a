"""`dvc repro` and `dvc exp run` for real, in a temporary git repo holding this project's files.

The chain runs on a shrunken copy of params.yaml (fewer, smaller images; 3-block teachers) so the
whole module stays around two minutes on two cores; the stages, commands and dvc.yaml are the real
ones. What is asserted is what a user relies on: metrics and plots appear, a student-only
experiment never re-runs a teacher or touches its store, an extraction change does re-run it, and a
store whose extraction was cut short is finished (not rebuilt) by the next `dvc repro`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "patch_size": 8, "depth": 3}  # 4x4 = 16 patches; mask layers 0, 1, 2

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # dvc.yaml's commands call `hdpipe`: take the one installed beside this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd, check)


def _tiny_params(params: dict) -> dict:
    p = json.loads(json.dumps(params))
    p["shard"].update(sample_train=48, shard_size=16, sample_probe_train=4, sample_probe_test=2)
    for section in ("extract_mim", "extract_disc"):
        p[section].update(model_kwargs=TINY, batch_size=16)
    p["distill"].update(model_kwargs=TINY, epochs=1, batch_size=8, workers=0)
    p["evaluate"].update(k=5)
    p["analyze"].update(model_kwargs=TINY, num_images=4, batch_size=4)
    return p


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_mtime_ns for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh git repo with this project's files (as a clone would have them) and tiny params."""
    dest = tmp_path_factory.mktemp("dvcrepo")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in listed:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("tests/", "benchmarks/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(_tiny_params(params), sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        _run(["git", *args], dest)
    return dest


@pytest.fixture(scope="module")
def reproduced(repo: Path) -> Path:
    _dvc(repo, "repro")
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], repo)
    return repo


def test_repro_writes_metrics_and_plots(reproduced: Path):
    train = json.loads((reproduced / "runs/hybrid/metrics.json").read_text())
    assert train["epoch"] == 1 and train["loss"] == train["loss"] and train["loss"] > 0  # finite, positive
    evaluation = json.loads((reproduced / "reports/evaluate/student.json").read_text())
    assert 0.0 <= evaluation["knn"]["top1"] <= 1.0 and evaluation["num_classes"] == 10
    for png in ("attention_distance.png", "nmi.png", "spectrum_summary.png"):
        data = (reproduced / "reports/analyze" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    shown = _dvc(reproduced, "metrics", "show", "--json").stdout
    assert "knn" in shown and "loss_relations" in shown
    # The loss figure plots the total; its data carry every column of plots/loss.csv, whose header follows
    # the loss's terms, so any term plots without an edit of dvc.yaml.
    figures = json.loads(_dvc(reproduced, "plots", "show", "--json").stdout)["data"]
    rows = figures["runs/hybrid/plots/loss.csv"][0]["content"]["data"]["values"]
    header = (reproduced / "runs/hybrid/plots/loss.csv").read_text().splitlines()[0].split(",")
    assert header[3:] == ["loss", "loss_features", "loss_relations"] and set(header) <= set(rows[0])
    term = _dvc(reproduced, "plots", "show", "runs/hybrid/plots/loss.csv", "-y", "loss_relations", "--json").stdout
    assert '"field": "loss_relations"' in term
    # Python writes bytecode beside the code a stage depends on (pipeline/data/__pycache__, ...):
    # that is no change of the code, so the pipeline stays up to date.
    cache = reproduced / "pipeline" / "data" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "reading.cpython-311.pyc").write_bytes(b"bytecode")
    status = _dvc(reproduced, "status").stdout
    assert "up to date" in status, status


@pytest.mark.parametrize(
    "override",
    ["distill.alpha=0.5", "distill.relation_layers=[2]"],  # a student knob; a layer ablation the store serves
)
def test_student_experiments_reuse_the_stores(reproduced: Path, override: str):
    before = {name: _mtimes(reproduced / "targets" / name) for name in ("mae.zarr", "clip.zarr")}
    out = _dvc(reproduced, "exp", "run", "-S", override).stdout
    for stage in ("shard", "extract_mim", "extract_disc"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert "Running stage 'distill'" in out
    after = {name: _mtimes(reproduced / "targets" / name) for name in ("mae.zarr", "clip.zarr")}
    assert after == before  # not a byte rewritten: same files, same modification times


def test_extraction_change_reruns_and_interrupted_store_resumes(reproduced: Path):
    params_path = reproduced / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["extract_mim"]["mask_ratio"] = 0.5
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = _dvc(reproduced, "repro", "extract_mim").stdout
    assert "Running stage 'extract_mim'" in out, out
    store = reproduced / "targets/mae.zarr"
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["hdpipe"]
    assert attrs["mask"]["ratio"] == 0.5

    # Cut the extraction short as a kill would: every shard after the first loses its done marker
    # (readers never trust such a shard). The next repro must finish those, not start over.
    markers = sorted((store / "done").iterdir())
    assert len(markers) == 3
    first = markers[0].stat().st_mtime_ns
    for m in markers[1:]:
        m.unlink()
    out = _dvc(reproduced, "repro", "extract_mim").stdout
    assert "Running stage 'extract_mim'" in out, out
    assert markers[0].stat().st_mtime_ns == first  # the finished shard was kept
    assert all(m.exists() for m in markers[1:])
