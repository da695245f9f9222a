"""Frozen-feature classifiers: weighted k-NN (as in DINO) and a linear probe, with top-k accuracy.

Both take precomputed features [N, D] (CLS or mean-pooled tokens, see `pool_tokens`) and integer
labels [N]; both run on the features' device (GPU when the caller put them there).

- k-NN: cosine similarity between L2-normalized test and train features; the k most similar train
  samples vote for their label with weight exp(sim / T) (DINO's `knn_classifier`, T = 0.07).
- Linear probe: multinomial logistic regression on features standardized with the *train* mean and
  std, fit full-batch with torch L-BFGS on mean cross-entropy + (weight_decay / 2)·‖W‖² (bias not
  decayed). This is the objective of sklearn's `LogisticRegression(C=1 / (weight_decay · N_train))`,
  written in torch so that it runs on the GPU for ImageNet-sized feature sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# k-NN: float32 similarities of one tile of test rows x train rows. 16 MB (1024 x 4096): a 64 MB tile
# and its top-k temporaries had added ~150 MB to evaluate's peak once the train split passed 16k rows.
KNN_BLOCK_BYTES = 16 * 2**20
# linear probe: train rows per block of the loss. A block's logits, softmax and gradients are its
# memory (~16 KB a row at 1000 classes, ~55 KB of peak RSS measured): 8192 rows had raised evaluate's
# peak RSS by ~450 MB once a labeled set reached them (the scale run's 1.5x at 10x the labeled images)
PROBE_ROWS = 2048


def pool_tokens(tokens: torch.Tensor, pooling: Literal["cls", "mean"], num_prefix: int = 1) -> torch.Tensor:
    """[B, N, D] final tokens -> [B, D]: the CLS token, or the mean of the patch tokens (prefix excluded)."""
    if pooling == "cls":
        if num_prefix < 1:
            raise ValueError("pooling='cls' needs a CLS token; this model has none (use pooling='mean')")
        return tokens[:, 0]
    if pooling == "mean":
        return tokens[:, num_prefix:].mean(dim=1)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Rows whose label is among the k highest scores, for each k ≤ number of classes.

    scores: [N, C], labels: [N]. Ties are broken by torch.topk's order (lowest class index first).
    """
    c = scores.shape[1]
    top = scores.topk(min(max(ks), c), dim=1).indices  # [N, kmax]
    hit = top == labels.view(-1, 1)
    return {k: int(hit[:, :k].any(dim=1).sum().item()) for k in ks if k <= c}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores, for each k ≤ number of classes."""
    return _fractions(topk_hits(scores, labels, ks), scores.shape[0])


def _fractions(hits: dict[int, int], n: int) -> dict[int, float]:
    return {k: h / max(n, 1) for k, h in hits.items()}  # count / n in Python floats: 0.38, not float32's 0.37999999


def _blockwise_accuracy(score_blocks, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """topk_accuracy over (start, scores [b, C]) blocks of the test rows, without their [N_test, C]
    scores at once (4 KB a test image at 1000 classes: evaluate's peak RSS grew with the labeled split)."""
    hits: dict[int, int] = {}
    n = 0
    for start, scores in score_blocks:
        for k, h in topk_hits(scores, labels[start : start + scores.shape[0]].to(scores.device), ks).items():
            hits[k] = hits.get(k, 0) + h
        n += scores.shape[0]
    return _fractions(hits, n)


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    train_chunk: int | None = None,
) -> torch.Tensor:
    """Class votes [N_test, C] of the temperature-weighted cosine k-NN (k capped at N_train).

    Similarities are computed in tiles of `chunk` test rows x `train_chunk` train rows (None: as many
    as fit KNN_BLOCK_BYTES), keeping a running top k per test row, so memory is one tile whatever
    N_train is. (A block of 1024 test rows against every train row held 164 MB at 40,000 train
    images and would hold 5.2 GB at ImageNet's 1.28 M; narrowing the block instead would re-read the
    whole train matrix for every few test rows.)
    """
    out = [votes for _, votes in _knn_vote_blocks(train_feats, train_labels, test_feats, num_classes, k, temperature,
                                                  chunk, train_chunk)]
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=train_feats.device)


@torch.no_grad()
def _knn_vote_blocks(train_feats, train_labels, test_feats, num_classes: int, k: int, temperature: float,
                     chunk: int = 1024, train_chunk: int | None = None):
    """(start, votes [b, C]) of each block of `chunk` test rows (knn_scores' tiles)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train = torch.nn.functional.normalize(train_feats.float(), dim=1)
    test = torch.nn.functional.normalize(test_feats.float(), dim=1)
    kk = min(k, train.shape[0])
    labels = train_labels.long().to(train.device)
    tile = train_chunk or max(kk, KNN_BLOCK_BYTES // (4 * chunk))
    for start in range(0, test.shape[0], chunk):
        q = test[start : start + chunk]
        top_sim = q.new_empty((q.shape[0], 0))
        top_idx = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for t0 in range(0, train.shape[0], tile):
            sim = q @ train[t0 : t0 + tile].T  # [b, tile]
            s, i = sim.topk(min(kk, sim.shape[1]), dim=1)
            top_sim, pos = torch.cat([top_sim, s], dim=1).topk(min(kk, top_sim.shape[1] + s.shape[1]), dim=1)
            top_idx = torch.cat([top_idx, i + t0], dim=1).gather(1, pos)
        weights = (top_sim / temperature).exp()  # [b, k]
        # each neighbour's weight added to its label's vote (no [N_train, C] one-hot: 4 KB a train image at C = 1000)
        votes = torch.zeros(weights.shape[0], num_classes, device=weights.device)
        yield start, votes.scatter_add_(1, labels[top_idx], weights)  # [b, C]


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[int, float]:
    """Top-1 (and top-5 when ≥ 5 classes) accuracy of the weighted k-NN: {1: acc, 5: acc}."""
    c = num_classes or int(max(train_labels.max(), test_labels.max()).item()) + 1
    return _blockwise_accuracy(_knn_vote_blocks(train_feats, train_labels, test_feats, c, k, temperature), test_labels)


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 500,
    num_classes: int | None = None,
) -> dict[int, float]:
    """Fit logistic regression on standardized train features, return test top-1 (top-5) accuracy.

    weight_decay: L2 strength λ on the weights (loss = mean CE + λ/2·‖W‖²).
    max_iter: L-BFGS iterations (strong-Wolfe line search), full batch.
    """
    fit = _fit_linear_probe(train_feats, train_labels, weight_decay, max_iter, num_classes)
    return _blockwise_accuracy(fit.blocks(test_feats), test_labels)


def linear_probe_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 500,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Logits [N_test, C] of the fitted linear probe (see module docstring for the objective)."""
    fit = _fit_linear_probe(train_feats, train_labels, weight_decay, max_iter, num_classes)
    out = [scores for _, scores in fit.blocks(test_feats)]
    return torch.cat(out) if out else torch.zeros(0, fit.w.shape[1], device=fit.w.device)


@dataclass
class _LinearProbe:
    """A fitted probe: logits = ((x - mean) / std) @ w + b."""

    mean: torch.Tensor
    std: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor

    @torch.no_grad()
    def blocks(self, test_feats: torch.Tensor, rows: int = PROBE_ROWS):
        """(start, logits [b, C]) of each block of `rows` test rows."""
        for s in range(0, test_feats.shape[0], rows):
            x = test_feats[s : s + rows].float().to(self.w.device)
            yield s, ((x - self.mean) / self.std) @ self.w + self.b


def _fit_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, weight_decay: float, max_iter: int,
                      num_classes: int | None) -> _LinearProbe:
    x = train_feats.float()
    y = train_labels.long().to(x.device)
    c = num_classes or int(y.max().item()) + 1
    mean = x.mean(dim=0, keepdim=True)
    # A constant feature has std 0; dividing by 1 leaves it at 0 after centering, which is harmless.
    std = x.std(dim=0, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    xs = (x - mean) / std
    w = torch.zeros(xs.shape[1], c, device=x.device, requires_grad=True)
    b = torch.zeros(c, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    n = xs.shape[0]

    def closure():
        # The loss of all rows, its gradient summed over blocks of PROBE_ROWS: logits, softmax and their
        # gradients exist for one block at a time (whole, they held ~16 KB a train image at 1000 classes).
        opt.zero_grad()
        loss = 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        total = loss.detach()
        for s in range(0, n, PROBE_ROWS):
            part = torch.nn.functional.cross_entropy(xs[s : s + PROBE_ROWS] @ w + b, y[s : s + PROBE_ROWS],
                                                     reduction="sum") / n
            part.backward()
            total = total + part.detach()
        return total

    with torch.enable_grad():
        opt.step(closure)
    return _LinearProbe(mean, std, w.detach(), b.detach())
