"""Hybrid loss against hand formulas, the AdamW recipe, and a short real training run on teacher targets."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.losses import hybrid_loss, whiten
from pipeline.train.optim import WarmupCosine, build_optimizer, param_groups, scaled_lr
from pipeline.train.student import HeadRule, MaskedStudent

TINY = dict(img_size=64, patch_size=8, depth=6)


def _smooth_l1(a, b, beta):
    d = (a - b).abs()
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean()


def test_whiten_is_layernorm_without_affine():
    f = torch.randn(2, 5, 16) * 3 + 7
    w = whiten(f)
    ref = (f - f.mean(-1, keepdim=True)) / torch.sqrt(f.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("teachers", ["hybrid", "disc_only", "mim_only"])
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_hybrid_loss_matches_hand_formula(teachers, beta):
    g = torch.Generator().manual_seed(1)
    B, T, Dt, H = 2, 7, 12, 3
    out = {"features": torch.randn(B, T, Dt, generator=g),
           "relations": {4: torch.randn(B, H, T, T, generator=g), 5: torch.randn(B, H, T, T, generator=g)}}
    batch = {"features": torch.randn(B, T, Dt, generator=g) * 5 + 1,
             "relations": torch.randn(B, 2, H, T, T, generator=g) * 4}
    got = hybrid_loss(out, batch, blocks=(4, 5), head_rule=HeadRule(3, 3), alpha=0.7, beta=beta, teachers=teachers)
    lf = _smooth_l1(out["features"], whiten(batch["features"]), beta)
    lr = _smooth_l1(torch.stack([out["relations"][4], out["relations"][5]], 1), batch["relations"], beta)
    want = {"hybrid": lf + 0.7 * lr, "disc_only": lf, "mim_only": lr}[teachers]
    torch.testing.assert_close(got["loss"], want)
    if teachers != "mim_only":
        torch.testing.assert_close(got["loss_features"], lf)
    if teachers != "disc_only":
        torch.testing.assert_close(got["loss_relations"], lr)


def test_relation_loss_averages_teacher_head_groups():
    B, T = 1, 4
    s = {"relations": {2: torch.zeros(B, 2, T, T)}}
    t = torch.zeros(B, 1, 4, T, T)
    t[:, :, 0] = 1.0
    t[:, :, 1] = 3.0  # group 0 = heads 0,1 -> mean 2; group 1 = heads 2,3 -> mean 0
    got = hybrid_loss(s, {"relations": t}, blocks=(2,), head_rule=HeadRule(2, 4), beta=1.0, teachers="mim_only")
    # |2 - 0| = 2 >= beta: 1.5 on half of the elements, 0 on the other half
    torch.testing.assert_close(got["loss"], torch.tensor(0.75))


def test_param_groups_no_decay_on_norms_biases_pos_cls():
    s = MaskedStudent("vit_tiny_patch16_224", TINY, feature_dim=32)
    decay, no_decay = param_groups(s, 0.05)
    names = {id(p): n for n, p in s.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"vit.pos_embed", "vit.cls_token", "vit.norm.weight", "vit.blocks.0.attn.qkv.bias",
            "feature_head.bias"} <= nd
    assert {"vit.blocks.0.attn.qkv.weight", "vit.patch_embed.proj.weight", "feature_head.weight"} <= d
    assert "vit.head.weight" not in d | nd  # frozen classifier stays out
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_lr_scaling_and_warmup_cosine():
    assert scaled_lr(6e-4, 256) == pytest.approx(1.5e-4)
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sch = WarmupCosine(opt, lr=1.0, total_steps=10, warmup_steps=2, min_lr=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sch.step()
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])  # MAE's per-iteration warmup: lr 0 at step 0
    for i in range(2, 10):
        assert lrs[i] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 8)))
    sch2 = WarmupCosine(torch.optim.AdamW([p], lr=1.0), lr=1.0, total_steps=10, warmup_steps=2, min_lr=0.1)
    sch2.load_state_dict(sch.state_dict())
    assert sch2.get_lr() == pytest.approx(sch.get_lr())


def _teacher_batches(n_batches, B=4, seed=0):
    """Synthetic batches from real tiny random-init teachers run here (tests only)."""
    from pipeline.targets.masking import progressive_keep
    from pipeline.targets.teachers import load_teacher

    torch.manual_seed(seed)
    mim = load_teacher("timm:vit_tiny_patch16_224", random_init=True, model_kwargs=TINY, device="cpu")
    disc = load_teacher("timm:vit_small_patch16_224", random_init=True, model_kwargs=dict(TINY, depth=4), device="cpu")
    batches = []
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        x01 = torch.rand(B, 3, 64, 64, generator=g)
        tm = mim.forward_targets(mim.normalize(x01), relation_layers=(4, 5), hidden_layers=(0, 2, 4))
        keep = progressive_keep(tm["hidden"], (0, 2, 4), 0.3)
        tok = torch.cat([torch.zeros(B, 1, dtype=torch.long), keep + 1], 1)
        rel = torch.stack([tm["relations"][i] for i in (4, 5)], 1)  # [B, 2, H, N, N]
        rel = torch.stack([rel[b][:, :, tok[b]][:, :, :, tok[b]] for b in range(B)])
        feats = disc.forward_targets(disc.normalize(x01), relation_layers=(), hidden_layers=())["features"]
        feats = torch.stack([feats[b, tok[b]] for b in range(B)])
        batches.append({"image": (x01 - 0.5) / 0.5, "keep_index": keep, "relations": rel.float(),
                        "features": feats.float()})
    return batches


def test_loss_decreases_on_real_teacher_targets():
    batches = _teacher_batches(4)
    torch.manual_seed(0)
    s = MaskedStudent("vit_tiny_patch16_224", TINY, feature_dim=batches[0]["features"].shape[-1],
                      relation_layers=(4, 5), teacher_depth=6, teacher_heads=3)
    opt = build_optimizer(s, lr=1e-3, weight_decay=0.05)
    s.train()
    losses = []
    for step in range(32):
        b = batches[step % len(batches)]
        out = s(b["image"], b["keep_index"])
        terms = hybrid_loss(out, b, blocks=s.capture_blocks, head_rule=s.head_rule)
        assert torch.isfinite(terms["loss"])
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, (first, last)


def test_block_features_target_is_whitened_per_layer():
    g = torch.Generator().manual_seed(3)
    out = {"block_features": {2: torch.randn(2, 5, 8, generator=g), 3: torch.randn(2, 5, 8, generator=g)}}
    tgt = torch.randn(2, 2, 5, 8, generator=g) * 3 + 2
    got = hybrid_loss(out, {"block_features": tgt}, blocks=(2, 3), target="block_features", teachers="mim_only")
    want = _smooth_l1(torch.stack([out["block_features"][2], out["block_features"][3]], 1), whiten(tgt), 1.0)
    torch.testing.assert_close(got["loss"], want)
