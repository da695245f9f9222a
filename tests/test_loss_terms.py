"""Loss terms are data (issue 21): a term registered in `pipeline.train.losses.LOSS_TERMS` from here, with
its weight in the config (`loss_weights`), is trained, logged (log.jsonl, plots/loss.csv, metrics.json,
the progress line) and resumed mid-epoch exactly, and no other module names it."""
from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch

from pipeline.errors import ConfigError, NonFiniteError
from pipeline.train.losses import LOSS_TERMS, hybrid_loss, term_weights, whiten
from stages.distill import distill
from test_distill import _cfg, _initial_student, _log, _steps, world  # noqa: F401 - `world` is a fixture


def l2_term(student_out: dict, batch: dict, ctx) -> torch.Tensor:
    """The toy term: mean squared error of the feature head vs the whitened teacher features."""
    return (student_out["features"].float() - whiten(batch["features"].float())).pow(2).mean()


@pytest.fixture
def l2(monkeypatch):
    monkeypatch.setitem(LOSS_TERMS, "l2", l2_term)  # the whole extension: one entry, and its weight in the config


def test_term_weights_follow_the_teachers_mode_and_the_config(l2):
    assert term_weights("hybrid", 0.5) == {"features": 1.0, "relations": 0.5}
    assert term_weights("disc_only", 0.5, {"l2": 0.1}) == {"features": 1.0, "l2": 0.1}
    assert term_weights("mim_only", 0.5) == {"relations": 1.0}  # a single term weighs 1, as before
    with pytest.raises(ConfigError, match=r"'nope' is not one of \['features', 'l2', 'relations'\]"):
        term_weights("hybrid", 1.0, {"nope": 1.0})
    with pytest.raises(ConfigError, match="'relations' is set by teachers and alpha"):
        term_weights("hybrid", 1.0, {"relations": 2.0})


def test_hybrid_loss_adds_a_registered_term_with_its_weight(l2):
    g = torch.Generator().manual_seed(0)
    out = {"features": torch.randn(2, 5, 8, generator=g)}
    batch = {"features": torch.randn(2, 5, 8, generator=g) * 3 + 1}
    got = hybrid_loss(out, batch, teachers="disc_only", loss_weights={"l2": 0.1})
    assert list(got) == ["loss", "loss_features", "loss_l2"]
    want_l2 = ((out["features"] - whiten(batch["features"])) ** 2).mean()
    torch.testing.assert_close(got["loss_l2"], want_l2)
    torch.testing.assert_close(got["loss"], got["loss_features"] + 0.1 * want_l2)


def test_a_registered_term_is_trained_logged_and_plotted(world, tmp_path, l2, capsys):  # noqa: F811 (a fixture)
    from pipeline.train.loader import build_loader
    from stages.distill import loader_config

    cfg = _cfg(world, tmp_path, loss_weights={"l2": 0.1}, print_every=1)
    run = distill(cfg)
    said = capsys.readouterr().err.splitlines()
    rows = _steps(run)
    assert len(rows) == 12 and all(list(r)[3:7] == ["loss", "loss_features", "loss_relations", "loss_l2"] for r in rows)
    for r in rows:  # the total is the weighted sum of the terms
        assert r["loss"] == pytest.approx(r["loss_features"] + r["loss_relations"] + 0.1 * r["loss_l2"], rel=1e-5)

    # step 1's value, computed here on the run's first batch with the student as initialized
    student = _initial_student(cfg)
    batch = next(iter(build_loader(loader_config(cfg, student, torch.device("cpu")), 0)))
    with torch.no_grad():
        feats = student(batch["image"], batch["keep_index"])["features"]
    by_hand = ((feats - whiten(batch["features"])) ** 2).mean().item()
    assert rows[0]["loss_l2"] == pytest.approx(by_hand, rel=1e-5)

    with (run / "plots" / "loss.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["step", "epoch", "lr", "loss", "loss_features", "loss_relations", "loss_l2"]
    assert [float(t["loss_l2"]) for t in table] == [r["loss_l2"] for r in rows]

    metrics = json.loads((run / "metrics.json").read_text())
    last = [r["loss_l2"] for r in rows if r["epoch"] == 1]
    assert metrics["loss_l2"] == pytest.approx(sum(last) / len(last), rel=1e-12)
    ends = [r for r in _log(run) if r.get("event") == "epoch_end"]
    assert [e["loss_l2"] for e in ends][-1] == metrics["loss_l2"]

    first = next(ln for ln in said if " step 1/12 " in ln)
    assert (f"loss {rows[0]['loss']:.4f} (features {rows[0]['loss_features']:.4f}, "
            f"relations {rows[0]['loss_relations']:.4f}, l2 {rows[0]['loss_l2']:.4f})") in first, first
    assert any("epoch end" in ln and f"l2 {metrics['loss_l2']:.4f}" in ln for ln in said)


def test_a_registered_term_resumes_mid_epoch_to_the_same_epoch_averages(world, tmp_path, l2,  # noqa: F811
                                                                        monkeypatch):
    """Stopped at step 5 (a NaN in the new term; checkpoint at step 4, mid-epoch 0), then resumed: the
    epoch averages, metrics.json and plots/loss.csv equal an uninterrupted run's."""
    full = distill(_cfg(world, tmp_path, name="full", loss_weights={"l2": 0.1}))

    calls = {"n": 0}

    def nan_at_call_5(out, batch, ctx):
        calls["n"] += 1
        return l2_term(out, batch, ctx) * (float("nan") if calls["n"] == 5 else 1.0)

    cfg = _cfg(world, tmp_path, name="cut", loss_weights={"l2": 0.1})
    monkeypatch.setitem(LOSS_TERMS, "l2", nan_at_call_5)
    with pytest.raises(NonFiniteError, match=r"step 5 .*'loss_l2': nan"):
        distill(cfg)
    assert [r["step"] for r in _steps(cfg.run_dir)] == [1, 2, 3, 4]
    monkeypatch.setitem(LOSS_TERMS, "l2", l2_term)
    cut = distill(replace(cfg, resume=True))

    ends = [[r for r in _log(d) if r.get("event") == "epoch_end"] for d in (full, cut)]
    assert [e["steps"] for e in ends[1]] == [6, 6] and "loss_l2" in ends[1][0] and ends[0] == ends[1]
    assert (cut / "metrics.json").read_text() == (full / "metrics.json").read_text()
    assert (cut / "plots" / "loss.csv").read_bytes() == (full / "plots" / "loss.csv").read_bytes()
