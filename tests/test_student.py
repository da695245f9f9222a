"""MaskedStudent: exactness against timm and independent Q·Kᵀ, layer/head mapping rules, refusals."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.train.student import HeadRule, MaskedStudent, map_relation_layers

TINY = dict(img_size=64, patch_size=8, depth=6)  # 64 patches, 3 heads, 192-d


def _student(**kw):
    torch.manual_seed(0)
    args = dict(model="vit_tiny_patch16_224", model_kwargs=TINY, feature_dim=96,
                relation_layers=(10, 11), teacher_depth=12, teacher_heads=3)
    args.update(kw)
    return MaskedStudent(**args).eval()


def _keep(B, n, N=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:n].sort().values for _ in range(B)])


def test_all_patches_equals_timm_forward_features():
    s = _student()
    x = torch.randn(2, 3, 64, 64)
    keep = torch.arange(64).expand(2, -1)
    with torch.no_grad():
        out = s(x, keep)
        ref = s.vit.forward_features(x)
    assert out["tokens"].shape == (2, 65, 192)
    torch.testing.assert_close(out["tokens"], ref, rtol=1e-5, atol=1e-5)
    assert out["features"].shape == (2, 65, 96)
    torch.testing.assert_close(out["features"], s.feature_head(ref), rtol=1e-5, atol=1e-5)


def _independent_kept_forward(vit, x, keep):
    """Reference: timm modules called one by one on [CLS]+kept tokens; Q·Kᵀ recomputed per block."""
    tok = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    tok = torch.stack([tok[b, keep[b]] for b in range(x.shape[0])])
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    h = torch.cat([cls, tok], 1)
    rels = {}
    for i, blk in enumerate(vit.blocks, start=1):
        a = blk.attn
        y = blk.norm1(h)
        B, T, C = y.shape
        q, k, _ = a.qkv(y).reshape(B, T, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        rels[i] = q @ k.transpose(-2, -1)
        h = blk(h)  # timm's own (fused) block output
    return vit.norm(h), rels


def test_relations_equal_independent_qk_on_kept_tokens():
    s = _student()
    x = torch.randn(3, 3, 64, 64)
    keep = _keep(3, 22)
    with torch.no_grad():
        out = s(x, keep)
        ref_tokens, ref_rels = _independent_kept_forward(s.vit, x, keep)
    assert s.capture_blocks == (4, 5)
    assert set(out["relations"]) == {4, 5}
    for b in (4, 5):
        assert out["relations"][b].shape == (3, 3, 23, 23)
        torch.testing.assert_close(out["relations"][b], ref_rels[b], rtol=1e-4, atol=1e-4)
    # the hand-written attention blocks give the same output as timm's fused ones
    torch.testing.assert_close(out["tokens"], ref_tokens, rtol=1e-5, atol=1e-5)


def test_attention_target_is_softmax_of_scaled_relations():
    s_rel = _student()
    s_att = _student(mim_target="attention")
    s_att.load_state_dict(s_rel.state_dict())
    x, keep = torch.randn(2, 3, 64, 64), _keep(2, 30)
    with torch.no_grad():
        r = s_rel(x, keep)["relations"][5]
        p = s_att(x, keep)["attention"][5]
    scale = s_rel.vit.blocks[4].attn.scale
    torch.testing.assert_close(p, (r * scale).softmax(-1), rtol=1e-5, atol=1e-6)


def test_block_features_target_heads():
    s = _student(mim_target="block_features", mim_dim=48)
    x, keep = torch.randn(2, 3, 64, 64), _keep(2, 30)
    out = s(x, keep)
    assert set(out["block_features"]) == {4, 5} and out["block_features"][4].shape == (2, 31, 48)


@pytest.mark.parametrize(
    "teacher_layers, lt, ls, expected",
    [
        ((10, 11), 12, 6, {10: 4, 11: 5}),
        ((11,), 12, 12, {11: 11}),
        ((1, 2, 3), 12, 12, {1: 1, 2: 2, 3: 3}),
        ((9, 10, 11), 12, 24, {9: 21, 10: 22, 11: 23}),
        ((5, 6), 6, 6, {5: 5, 6: 6}),
    ],
)
def test_layer_mapping_counted_from_the_end(teacher_layers, lt, ls, expected):
    assert map_relation_layers(teacher_layers, lt, ls) == expected


def test_layer_mapping_errors():
    with pytest.raises(ConfigError, match="too shallow"):
        map_relation_layers((1, 2, 3), 12, 6)
    with pytest.raises(ConfigError, match="not a block"):
        map_relation_layers((13,), 12, 12)


def test_head_rule_groups_consecutive_heads():
    rule = HeadRule(student_heads=3, teacher_heads=12)
    t = torch.arange(12.0).reshape(1, 1, 12, 1, 1).expand(1, 1, 12, 2, 2)
    got = rule.teacher(t, heads_dim=2)[0, 0, :, 0, 0]
    torch.testing.assert_close(got, torch.tensor([1.5, 5.5, 9.5]))  # mean of heads 0-3, 4-7, 8-11
    s = torch.randn(1, 1, 3, 2, 2)
    assert rule.student(s, heads_dim=2) is s  # student side untouched when Hs < Ht
    rule2 = HeadRule(student_heads=6, teacher_heads=3)
    s6 = torch.arange(6.0).reshape(1, 6, 1, 1)
    torch.testing.assert_close(rule2.student(s6, heads_dim=1)[0, :, 0, 0], torch.tensor([0.5, 2.5, 4.5]))
    with pytest.raises(ConfigError, match="4 attention heads and the MIM teacher 6"):
        HeadRule(4, 6)


def test_student_with_mismatched_heads_fails_at_construction():
    with pytest.raises(ConfigError, match="3 attention heads and the MIM teacher 4"):
        _student(teacher_heads=4)


def test_refuses_register_tokens_and_no_cls():
    with pytest.raises(ConfigError, match="register tokens"):
        MaskedStudent("vit_tiny_patch16_224", dict(TINY, reg_tokens=4))
    with pytest.raises(ConfigError, match="no CLS token"):
        MaskedStudent("vit_tiny_patch16_224", dict(TINY, class_token=False, global_pool="avg"))
    with pytest.raises(ConfigError, match="not a timm VisionTransformer"):
        MaskedStudent("resnet18")


def test_encoder_has_no_classifier_to_export():
    """Distillation trains no classifier, so the student has none (an untrained 1000-class head
    would travel with the export and load as if it were trained)."""
    s = _student()
    assert s.vit.num_classes == 0 and isinstance(s.vit.get_classifier(), torch.nn.Identity)
    assert not [k for k in s.encoder_state_dict() if k.startswith(("head", "feature_head"))]
    assert _student(model_kwargs={**TINY, "num_classes": 7}).vit.get_classifier().out_features == 7  # asked for: kept


def test_gradients_reach_encoder_through_relations_and_features():
    s = _student().train()
    x, keep = torch.randn(2, 3, 64, 64), _keep(2, 20)
    out = s(x, keep)
    (out["features"].sum() + out["relations"][4].sum()).backward()
    assert s.vit.patch_embed.proj.weight.grad is not None
    assert s.vit.blocks[3].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    ({**TINY, "bogus_kw": 1}, "model 'vit_tiny_patch16_224' has no argument 'bogus_kw'"),
    ({"img_size": -64}, "model 'vit_tiny_patch16_224' cannot be built with model kwargs {'img_size': -64}"),
])
def test_student_model_kwargs_the_model_rejects_are_a_config_error(kwargs, message):
    """distill's --model-kwargs reach the student's constructor: their rejection names kwarg and option."""
    with pytest.raises(ConfigError) as e:
        _student(model_kwargs=kwargs)
    assert str(e.value).startswith(message) and "--model-kwargs" in str(e.value), e.value


def test_unknown_student_model_is_named_before_its_kwargs():
    with pytest.raises(ConfigError, match="student model 'vit_nosuch': timm has no such model"):
        _student(model="vit_nosuch", model_kwargs={"bogus_kw": 1})
