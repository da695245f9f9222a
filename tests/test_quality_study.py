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

    # The views x epochs study on the same work folder: data, teachers, stores and the 8-epoch lr
    # sweep are reused (equal results), only the long runs train.
    sys.path.insert(0, str(QUALITY))
    try:
        from views_study import main as views_main
    finally:
        sys.path.remove(str(QUALITY))
    # one long run in a second work folder (a second process's share), merged into the first's
    import shutil

    shutil.copytree(tmp_path / "work", tmp_path / "share")
    share = views_main(["--quick", "--idx-dir", str(idx), "--work", str(tmp_path / "share"), "--device", "cpu",
                        "--only", "long-views2-seed1"])
    assert set(share) == {"long-views2-seed1"}
    views = views_main(["--quick", "--idx-dir", str(idx), "--work", str(tmp_path / "work"), "--out",
                        str(tmp_path / "views"), "--device", "cpu", "--merge", str(tmp_path / "share")])
    merged = views["runs"]["long-views2-seed1"]
    assert merged["merged_from"] == str(tmp_path / "share") and merged["knn_top1"] == share["long-views2-seed1"][
        "knn_top1"]
    assert "merged_from" not in views["runs"]["long-views1-seed1"]
    assert views["lr_sweep"]["0.002"]["knn_top1"] == report["students"]["hybrid-lr0.002"]["knn_top1"]
    curve = views["curve"]
    assert set(curve) == {"long-views1", "long-views2", "long-views2-resample0.75", "long-online"}
    assert all(e["seeds"] == 2 for e in curve.values())
    assert curve["long-views1"]["showings_per_view"] == 2 and curve["long-views2"]["showings_per_view"] == 1
    got = views["runs"]["long-views2-resample0.75-seed1"]["settings"]
    assert {k: got[k] for k in ("views_used", "seed", "token_resample", "epochs")} == {
        "views_used": 2, "seed": 1, "token_resample": 0.75, "epochs": 2}
    for e in curve.values():  # ratios and seed means are what the runs measured
        knn = [views["runs"][k]["knn_top1"] for k in views["runs"] if k.split("-seed")[0] == e_name(curve, e)]
        assert e["knn_top1"]["mean"] == pytest.approx(sum(knn) / len(knn))
        assert e["of_online"]["knn_top1"] == pytest.approx(e["knn_top1"]["mean"]
                                                           / curve["long-online"]["knn_top1"]["mean"])
    rule = views["rule"]
    if rule is not None:  # the smallest V meeting 99% on both metrics, if any does
        ok = [e["views"] for e in curve.values() if e["views"] and min(e["of_online"].values()) >= 0.99]
        assert rule["views"] == min(ok)
    assert (tmp_path / "views" / "views-epochs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| long-online | fresh |" in capsys.readouterr().out


def e_name(curve: dict, entry: dict) -> str:
    return next(name for name, e in curve.items() if e is entry)
