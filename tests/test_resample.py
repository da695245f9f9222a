"""Token resampling's pure parts against an independent computation: subset counts and seeding,
sub-matrices of relations, renormalized attention = softmax over the subset, per-token features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.train.resample import resample_batch, resampled_count, token_subset


@pytest.mark.parametrize("n, fraction, m", [(67, 0.75, 50), (67, 1.0, 67), (4, 0.1, 1), (10, 0.25, 3), (10, 0.35, 4)])
def test_count_is_round_half_up_at_least_one(n, fraction, m):
    assert resampled_count(n, fraction) == m
    sub = token_subset(0, 0, 5, n, fraction)
    assert len(sub) == m and np.all(np.diff(sub) > 0) and sub.min() >= 0 and sub.max() < n


def test_subset_is_a_pure_function_of_seed_epoch_index():
    a = token_subset(3, 7, 11, 67, 0.75)
    np.testing.assert_array_equal(a, token_subset(3, 7, 11, 67, 0.75))
    others = [token_subset(4, 7, 11, 67, 0.75), token_subset(3, 8, 11, 67, 0.75), token_subset(3, 7, 12, 67, 0.75)]
    assert all(not np.array_equal(a, o) for o in others)


def test_resample_batch_against_per_sample_slicing():
    g = torch.Generator().manual_seed(0)
    B, L, H, n, D = 3, 2, 4, 9, 5
    T = 1 + n
    logits = torch.randn(B, L, H, T, T, generator=g)
    batch = {"index": torch.tensor([4, 17, 2]), "keep_index": torch.sort(torch.randperm(30, generator=g)[:n]).values
             .expand(B, n).clone(), "relations": logits.clone(), "attention": logits.softmax(-1),
             "features": torch.randn(B, T, D, generator=g), "block_features": torch.randn(B, L, T, D, generator=g)}
    out = resample_batch(batch, 0.5, seed=1, epoch=2)
    for b, index in enumerate([4, 17, 2]):
        sub = token_subset(1, 2, index, n, 0.5)
        tok = np.concatenate([[0], sub + 1])
        assert out["keep_index"][b].tolist() == batch["keep_index"][b, sub].tolist()
        sel = logits[b][:, :, tok][:, :, :, tok]
        torch.testing.assert_close(out["relations"][b], sel)  # a sub-matrix of raw Q·Kᵀ
        torch.testing.assert_close(out["attention"][b], sel.softmax(-1))  # softmax over the shown tokens
        torch.testing.assert_close(out["features"][b], batch["features"][b, tok])
        torch.testing.assert_close(out["block_features"][b], batch["block_features"][b][:, tok])
    assert resample_batch(batch, 1.0, seed=1, epoch=2) is batch


def test_view_reuse_line_warns_past_the_measured_range():
    from pipeline.train.plan import SAFE_SHOWINGS_PER_VIEW, view_reuse

    line, warn = view_reuse(8, 2)
    assert line == "each stored view is shown ~4 times (8 epochs over 2 stored view(s))" and not warn
    line, warn = view_reuse(300, 2, 0.75)
    assert warn and "~150 times" in line and "0.75 of its tokens" in line and f"{SAFE_SHOWINGS_PER_VIEW:g}" in line


def test_the_imagenet_recipe_stays_within_the_measured_range():
    """params-imagenet.yaml stores enough views that its epochs show each at most the measured safe
    number of times (the views x epochs study's rule), so its own distill start-up does not warn."""
    from pathlib import Path

    import yaml

    from pipeline.train.plan import view_reuse

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "params-imagenet.yaml").read_text())
    epochs, views = recipe["distill"]["epochs"], recipe["extract_mim"]["views"]
    line, warn = view_reuse(epochs, recipe["distill"].get("views_used") or views)
    assert not warn, line
    assert view_reuse(epochs, views - 1)[1]  # and no more views than the rule needs
