"""The quality study's --quick mode, end to end on a tiny synthetic idx-format stand-in: every step
(export, shard, teacher pretraining, extraction, the lr/views/alpha/seed students, online, fine-tune
evaluation, analysis, outputs) runs, and the outputs hold what the README table is made from."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"

pytestmark = pytest.mark.slow


def test_quick_study_runs_end_to_end(tmp_path, capsys):
    sys.path.insert(0, str(QUALITY))
    try:
        from fashion import synthetic_idx
        from study import main
    finally:
        sys.path.remove(str(QUALITY))
    idx = synthetic_idx(tmp_path / "idx")
    report = main(["--quick", "--idx-dir", str(idx), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                   "--device", "cpu"])
    saved = json.loads((tmp_path / "out" / "study.json").read_text())
    assert saved["comparison"] == json.loads(json.dumps(report["comparison"]))
    assert (tmp_path / "out" / "views.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    students = saved["students"]
    for label in ("hybrid-lr0.002", "disc_only-lr0.02", "mim_only-lr0.002", "online-hybrid", "hybrid-views1",
                  "hybrid-alpha0.3", "hybrid-beta2", "online-hybrid-seed1"):
        r = students[label]
        for key in ("knn_top1", "linear_top1", "finetune_top1", "attention_distance_mean", "nmi_mean", "train_wall_s"):
            assert 0 <= r[key] and r[key] == r[key], (label, key)
    assert students["online-hybrid"]["settings"]["source"] == "online"
    assert students["hybrid-views1"]["settings"]["views_used"] == 1
    assert students["hybrid-beta2"]["settings"]["smoothl1_beta"] == 2.0
    assert saved["extraction"]["extract_mim"]["views"] == 2 and saved["comparison"]["bytes_per_view"] > 0
    assert set(saved["teachers"]) == {"mim", "disc"} and "finetune_top1" in saved["teachers"]["mim"]["eval"]
    long = saved["finetune_long"]  # the longer fine-tune of the models the conclusions rest on
    assert {"teacher-mim", "teacher-disc", "online-hybrid", "hybrid-seed1", "online-hybrid-seed1"} <= set(long)
    assert all(0 <= v <= 1 for v in long.values()) and saved["comparison"]["cached_over_online_finetune_long"] > 0
    printed = capsys.readouterr().out
    assert "| online-hybrid |" in printed and "fine-tune (1 ep)" in printed
    # rerun: every step is cached in the work folder, nothing is recomputed
    again = main(["--quick", "--idx-dir", str(idx), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out2"),
                  "--device", "cpu"])
    assert again["students"] == report["students"]
