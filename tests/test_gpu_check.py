"""benchmarks/gpu_check.sh: refuses loudly without a GPU, and asks the benchmarks only for options they have."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_fails_loudly_without_a_gpu(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, GPU_CHECK_OUT=str(out))
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check: FAILED: no CUDA GPU" in proc.stderr
    assert "nothing was measured" in proc.stderr
    assert not out.exists()  # it stopped before measuring or writing anything


def _invocations(text: str) -> list[tuple[str, set[str]]]:
    """(benchmark script, options it is given) for every benchmark the check runs."""
    joined = re.sub(r"\\\n\s*", " ", text)  # join continuation lines
    calls = []
    for line in joined.splitlines():
        m = re.search(r"(benchmarks/bench_\w+\.py)(.*)", line)
        if m and not line.lstrip().startswith("#"):
            calls.append((m.group(1), set(re.findall(r"(--[a-z][a-z-]*)", m.group(2)))))
    return calls


def test_gpu_check_uses_only_options_the_benchmarks_have():
    calls = _invocations(SCRIPT.read_text())
    assert {c for c, _ in calls} == {"benchmarks/bench_extract.py", "benchmarks/bench_distill.py",
                                     "benchmarks/bench_host.py"}
    for script, options in calls:
        help_text = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                                   cwd=ROOT, timeout=120, check=True).stdout
        missing = sorted(o for o in options if o not in help_text)
        assert not missing, f"{script} has no option(s) {missing} that gpu_check.sh passes"
    assert "--geometry" in dict(calls)["benchmarks/bench_distill.py"]  # ViT-B geometry, not ViT-S


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the check itself only where a GPU is")
def test_gpu_check_runs_on_a_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path / "gpu"))
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage two cached" in proc.stdout and (tmp_path / "gpu" / "distill.json").exists()
