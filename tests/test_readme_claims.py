"""The numbers README.md states about how hdpipe works are the code's: each claim is found in the
README by a pattern (so rewording it fails here, loudly) and compared with what the code computes."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _claim(pattern: str) -> re.Match:
    m = re.search(pattern, README)
    assert m, f"README no longer states {pattern!r}: update the claim and this test together"
    return m


@pytest.mark.parametrize("pattern, patches, ratio", [
    (r"196 → 137 → 96 → 67 at K = 0\.3", 196, 0.3),  # How it works: ViT-B/16 at 224 px
    (r"64 → 45 → 31 → 22 kept", 64, 0.3),  # the embedded default: 8x8 patches
])
def test_mask_counts(pattern, patches, ratio):
    from pipeline.targets.masking import kept_count

    stated = [int(v) for v in re.findall(r"\d+", _claim(pattern).group(0).split(" at ")[0])[:4]]
    assert stated == [kept_count(patches, ratio, stages=s) for s in range(4)]


def test_mask_layers_are_0_L3_2L3():
    from pipeline.targets.masking import mask_layers

    _claim(r"entering blocks \{0, L/3, 2L/3\}")
    assert mask_layers(12) == (0, 4, 8) and mask_layers(6) == (0, 2, 4)


def test_lr_scaling_and_recipe_defaults():
    from pipeline.train.optim import scaled_lr
    from stages.distill import DistillConfig

    m = _claim(r"lr = ([\d.e-]+) ×\s+global batch / (\d+), wd ([\d.]+)")
    base, batch, wd = float(m.group(1)), int(m.group(2)), float(m.group(3))
    assert scaled_lr(base, batch) == pytest.approx(base) and scaled_lr(base, 2 * batch) == pytest.approx(2 * base)
    assert DistillConfig().base_lr == base and DistillConfig().weight_decay == wd


def test_knn_temperature_and_center_crop():
    from pipeline.eval import probe, subjects

    t = float(_claim(r"exp\(sim/([\d.]+)\) votes").group(1))
    assert inspect.signature(probe.knn_scores).parameters["temperature"].default == t
    crop = float(_claim(r"shorter side to img_size/([\d.]+)").group(1))
    assert inspect.signature(subjects.center_view).parameters["crop_pct"].default == crop


def test_view_scale():
    from pipeline.data.views import VIEW_DEFAULTS

    lo, hi = (float(v) for v in _claim(r"RandomResizedCrop \(scale \(([\d.]+), ([\d.]+)\)").groups())
    assert tuple(VIEW_DEFAULTS["scale"]) == (lo, hi)
