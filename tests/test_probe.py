"""k-NN and linear-probe checks (pipeline/eval/probe.py) against closed cases and independent implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.eval import probe


def _clusters(n_per_class, num_classes, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(num_classes, dim) * 10.0
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


@pytest.mark.parametrize("num_classes", [3, 6])
def test_separable_features_give_full_accuracy(num_classes):
    xtr, ytr = _clusters(20, num_classes, 16, 0.5, seed=0)
    xte, yte = _clusters(10, num_classes, 16, 0.5, seed=1)
    knn = probe.knn_accuracy(xtr, ytr, xte, yte, k=10)
    lin = probe.linear_probe(xtr, ytr, xte, yte)
    assert knn[1] == 1.0 and lin[1] == 1.0
    # top-5 only exists with at least 5 classes
    assert (5 in knn) == (num_classes >= 5) and (5 in lin) == (num_classes >= 5)
    if num_classes >= 5:
        assert knn[5] == 1.0 and lin[5] == 1.0


def test_shuffled_labels_near_chance():
    """Labels independent of features: accuracy is Binomial(n, 1/C)/n; allow 4 standard deviations."""
    g = torch.Generator().manual_seed(3)
    c, n_tr, n_te, d = 4, 800, 800, 32
    xtr, xte = torch.randn(n_tr, d, generator=g), torch.randn(n_te, d, generator=g)
    ytr = torch.randint(0, c, (n_tr,), generator=g)
    yte = torch.randint(0, c, (n_te,), generator=g)
    sd = math.sqrt((1 / c) * (1 - 1 / c) / n_te)
    for acc in (probe.knn_accuracy(xtr, ytr, xte, yte, k=20)[1], probe.linear_probe(xtr, ytr, xte, yte)[1]):
        assert abs(acc - 1 / c) < 4 * sd
    # the same features with informative labels are far above chance: the test can tell the two apart
    xs, ys = _clusters(100, c, d, 6.0, seed=4)
    xq, yq = _clusters(100, c, d, 6.0, seed=5)
    assert probe.knn_accuracy(xs, ys, xq, yq, k=20)[1] > 1 / c + 8 * sd


def test_knn_votes_match_bruteforce():
    g = torch.Generator().manual_seed(5)
    xtr, xte = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    ytr = torch.randint(0, 5, (50,), generator=g)
    k, t = 6, 0.07
    got = probe.knn_scores(xtr, ytr, xte, num_classes=5, k=k, temperature=t, chunk=3, train_chunk=7).numpy()
    a, b = xtr.double().numpy(), xte.double().numpy()
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    want = np.zeros((7, 5))
    for i in range(7):
        sims = a @ b[i]
        for j in np.argsort(-sims)[:k]:
            want[i, ytr[j]] += math.exp(sims[j] / t)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_knn_tiles_bound_memory_and_give_the_same_votes(monkeypatch):
    """Similarities are tiles of test rows x KNN_BLOCK_BYTES of train rows with a running top k:
    bounded memory at any N_train, the same votes as one tile of everything (and as brute force,
    `test_knn_votes_match_bruteforce`, whose 3-row tiles merge too)."""
    g = torch.Generator().manual_seed(6)
    xtr, xte = torch.randn(300, 8, generator=g), torch.randn(40, 8, generator=g)
    ytr = torch.randint(0, 5, (300,), generator=g)
    tiles = []
    real = torch.Tensor.topk
    monkeypatch.setattr(probe, "KNN_BLOCK_BYTES", 4 * 16 * 70)  # 70 train rows per tile of 16 test rows
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, *a, **k: tiles.append(self.shape) or real(self, *a, **k))
    got = probe.knn_scores(xtr, ytr, xte, num_classes=5, k=6, chunk=16)
    assert (16, 70) in tiles and max(a * b for a, b in tiles) <= 16 * 70
    monkeypatch.setattr(torch.Tensor, "topk", real)
    torch.testing.assert_close(got, probe.knn_scores(xtr, ytr, xte, num_classes=5, k=6, chunk=40, train_chunk=300))


def test_linear_probe_matches_sklearn():
    """Same objective as sklearn LogisticRegression(C = 1 / (λ·N)) on standardized features."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(6)
    n, d, c, lam = 120, 10, 3, 1e-2
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 5.0, d) + 3.0
    w_true = torch.randn(d, c, generator=g)
    y = (x @ w_true + torch.randn(n, c, generator=g)).argmax(1)
    xq = torch.randn(40, d, generator=g) * torch.linspace(0.5, 5.0, d) + 3.0
    logits = probe.linear_probe_scores(x, y, xq, weight_decay=lam, max_iter=1000)
    ours = torch.softmax(logits, dim=1).numpy()
    mean, std = x.mean(0).numpy(), x.std(0, unbiased=False).numpy()
    clf = LogisticRegression(C=1.0 / (lam * n), max_iter=5000, tol=1e-10)
    clf.fit((x.numpy() - mean) / std, y.numpy())
    theirs = clf.predict_proba((xq.numpy() - mean) / std)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_pool_tokens():
    t = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    torch.testing.assert_close(probe.pool_tokens(t, "cls"), t[:, 0])
    torch.testing.assert_close(probe.pool_tokens(t, "mean"), t[:, 1:].mean(1))
    torch.testing.assert_close(probe.pool_tokens(t, "mean", num_prefix=0), t.mean(1))
    with pytest.raises(ValueError):
        probe.pool_tokens(t, "cls", num_prefix=0)


def test_accuracies_come_from_blocks_of_test_rows_and_equal_whole_score_matrices(monkeypatch):
    """evaluate's accuracies never hold [N_test, C] scores (4 KB a test image at 1000 classes): k-NN
    votes and probe logits are scored a block of test rows at a time, with the same hits as the
    whole matrices give."""
    g = torch.Generator().manual_seed(0)
    C, D = 50, 8
    centers = torch.randn(C, D, generator=g) * 2
    ytr, yte = torch.randint(0, C, (600,), generator=g), torch.randint(0, C, (2500,), generator=g)
    xtr = centers[ytr] + torch.randn(600, D, generator=g)
    xte = centers[yte] + torch.randn(2500, D, generator=g)
    widths = []
    hits = probe.topk_hits
    monkeypatch.setattr(probe, "topk_hits", lambda s, y, ks=(1, 5): widths.append(s.shape[0]) or hits(s, y, ks))
    knn = probe.knn_accuracy(xtr, ytr, xte, yte, k=10, num_classes=C)
    assert widths == [1024, 1024, 452]
    assert knn == probe.topk_accuracy(probe.knn_scores(xtr, ytr, xte, C, k=10), yte)
    widths.clear()
    lin = probe.linear_probe(xtr, ytr, xte, yte, max_iter=20, num_classes=C)
    assert widths == [probe.PROBE_ROWS, 2500 - probe.PROBE_ROWS]
    assert lin == probe.topk_accuracy(probe.linear_probe_scores(xtr, ytr, xte, max_iter=20, num_classes=C), yte)
    assert 0.2 < knn[1] < 1 and 0.2 < lin[1] < 1
