"""Token masks against a hand-computed example and an independent numpy implementation."""
import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.targets.masking import (
    direct_keep,
    kept_count,
    mask_layers,
    progressive_keep,
    random_keep,
)


def _reference_progressive(hidden_np: dict, layers, ratio, num_prefix=1):
    """Loop-per-sample numpy version of the rule, written from the paper's description."""
    batch, n_tokens, _ = hidden_np[layers[0]].shape
    out = []
    for b in range(batch):
        kept = list(range(n_tokens - num_prefix))
        for layer in layers:
            tokens = hidden_np[layer][b, num_prefix:][kept]  # [n, D]
            mean = tokens.mean(axis=0)
            sims = tokens @ mean / (np.linalg.norm(tokens, axis=1) * np.linalg.norm(mean))
            n_drop = int(np.floor(ratio * len(kept) + 0.5))
            order = np.argsort(-sims, kind="stable")
            kept = sorted(kept[i] for i in order[n_drop:])
        out.append(kept)
    return np.array(out)


def test_mask_layers():
    assert mask_layers(12) == (0, 4, 8)
    assert mask_layers(6) == (0, 2, 4)
    assert mask_layers(24) == (0, 8, 16)


@pytest.mark.parametrize("patches,ratio,stages,expected", [
    (196, 0.3, 1, 137), (196, 0.3, 2, 96), (196, 0.3, 3, 67),
    (196, 0.0, 3, 196), (64, 0.3, 3, 22), (256, 0.5, 2, 64), (5, 0.5, 1, 2),
])
def test_kept_count_table(patches, ratio, stages, expected):
    assert kept_count(patches, ratio, stages) == expected


def test_hand_computed_example():
    # CLS + 5 patches in 2-D. Layer 0: mean patch = (0.4, 0.2); cosine similarities
    # p0 .894, p1 .934, p2 .447, p3 .846, p4 -.894; ratio 0.4 drops round(2.0) = 2 -> p1, p0.
    # Layer 1 (p4 moved to (0.5, 2)): kept p2 (0,1), p3 (1,-.1), p4 (.5,2), mean (.5,.967);
    # similarities .888, .369, .973; drops round(1.2) = 1 -> p4. Kept: p2, p3.
    layer0 = torch.tensor([[9.0, 9.0], [1, 0], [1, 0.1], [0, 1], [1, -0.1], [-1, 0]])
    layer1 = layer0.clone()
    layer1[5] = torch.tensor([0.5, 2.0])
    keep = progressive_keep({0: layer0[None], 1: layer1[None]}, (0, 1), ratio=0.4)
    assert keep.tolist() == [[2, 3]]
    assert keep.dtype == torch.long
    # Layer 0 alone keeps p2, p3, p4 (layer 1 then uses its own hidden state, not layer 0's,
    # which would have dropped p2 and kept p3, p4).
    assert progressive_keep({0: layer0[None]}, (0,), ratio=0.4).tolist() == [[2, 3, 4]]


def test_sequence_196_137_96_67_and_reference_agreement():
    gen = torch.Generator().manual_seed(0)
    hidden = {layer: torch.randn(3, 197, 32, generator=gen) for layer in (0, 4, 8)}
    for stages, expected in ((1, 137), (2, 96), (3, 67)):
        layers = (0, 4, 8)[:stages]
        keep = progressive_keep(hidden, layers, 0.3)
        assert keep.shape == (3, expected)
        ref = _reference_progressive({k: v.numpy().astype(np.float64) for k, v in hidden.items()}, layers, 0.3)
        assert keep.tolist() == ref.tolist()
        assert torch.all(keep[:, 1:] > keep[:, :-1])  # sorted, unique
        assert keep.min() >= 0 and keep.max() < 196  # patch indices: CLS excluded


def test_cls_token_is_ignored():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 65, 16, generator=gen)
    other = hidden.clone()
    other[:, 0] = 1e3  # a huge CLS would dominate the mean if it were counted
    assert torch.equal(progressive_keep({0: hidden}, (0,), 0.3), progressive_keep({0: other}, (0,), 0.3))


def test_invariant_to_batch_composition():
    gen = torch.Generator().manual_seed(2)
    hidden = {layer: torch.randn(6, 65, 24, generator=gen) for layer in (0, 2, 4)}
    full = progressive_keep(hidden, (0, 2, 4), 0.3)
    for b in range(6):
        single = progressive_keep({k: v[b:b + 1] for k, v in hidden.items()}, (0, 2, 4), 0.3)
        assert torch.equal(single[0], full[b])
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    permuted = progressive_keep({k: v[perm] for k, v in hidden.items()}, (0, 2, 4), 0.3)
    assert torch.equal(permuted, full[perm])
    direct = direct_keep(hidden[4], 22)
    assert torch.equal(direct_keep(hidden[4][perm], 22), direct[perm])


def test_ties_break_by_lower_index_first_dropped():
    hidden = torch.ones(2, 11, 4)  # every patch identical: every similarity ties exactly
    keep = progressive_keep({0: hidden}, (0,), 0.3)  # 10 patches, drop 3
    assert keep.tolist() == [list(range(3, 10))] * 2
    assert direct_keep(hidden, 7).tolist() == [list(range(3, 10))] * 2


def test_ratio_zero_keeps_all():
    hidden = {0: torch.randn(2, 17, 8), 1: torch.randn(2, 17, 8)}
    assert progressive_keep(hidden, (0, 1), 0.0).tolist() == [list(range(16))] * 2


def test_direct_keep_matches_reference_and_count():
    gen = torch.Generator().manual_seed(3)
    last = torch.randn(4, 197, 32, generator=gen)
    n_keep = kept_count(196, 0.3)
    keep = direct_keep(last, n_keep)
    assert keep.shape == (4, 67)
    x = last[:, 1:].double().numpy()
    for b in range(4):
        mean = x[b].mean(0)
        sims = x[b] @ mean / (np.linalg.norm(x[b], axis=1) * np.linalg.norm(mean))
        expected = sorted(np.argsort(sims, kind="stable")[:67].tolist())  # the 67 least similar
        assert keep[b].tolist() == expected


def test_random_keep_is_a_pure_function_of_seed_index_view():
    a = random_keep([0, 1, 2, 2], [0, 0, 0, 1], 196, 67, seed=5)
    assert a.shape == (4, 67) and a.dtype == torch.long
    assert all(len(set(row.tolist())) == 67 for row in a)
    assert torch.all(a[:, 1:] > a[:, :-1])
    b = random_keep([2, 0], [0, 0], 196, 67, seed=5)  # other batch, same views
    assert torch.equal(b[0], a[2]) and torch.equal(b[1], a[0])
    assert not torch.equal(a[2], a[3])  # another view of the same image
    assert not torch.equal(random_keep([0], [0], 196, 67, seed=6)[0], a[0])


def test_bad_arguments():
    with pytest.raises(ConfigError, match="ratio"):
        kept_count(196, 1.0)
    with pytest.raises(ConfigError, match="layers"):
        progressive_keep({0: torch.randn(1, 5, 2)}, (0, 3), 0.3)
    with pytest.raises(ConfigError, match="n_keep"):
        direct_keep(torch.randn(1, 5, 2), 5)
