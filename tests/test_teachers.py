"""Teachers: targets against independent computations from the modules' own weights.

Real timm and open_clip models, small variants, random init, CPU. Tolerances are for fp32 on CPU
(the teacher runs fp32 there; bf16 autocast is CUDA-only).
"""
import argparse
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.errors import ConfigError, HdpipeError, NonFiniteError
from pipeline.targets.specs import IMAGENET_MEAN, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, TEACHERS, parse_spec
from pipeline.targets.teachers import load_teacher
from pipeline.targets.weights import read_checkpoint, weights_digest

TIMM = "timm:vit_tiny_patch16_224"
TINY = {"img_size": 64, "patch_size": 8, "depth": 6}  # 64 patches, 3 heads, 192-d
OPEN_CLIP = "open_clip:ViT-B-16-quickgelu"
OPEN_CLIP_TINY = {
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"width": 32, "heads": 2, "layers": 1, "context_length": 8, "vocab_size": 64},
    "embed_dim": 32,
}
ATOL = 2e-5


def _batch(seed=0, b=2, size=64):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomize(module, seed):
    """Non-trivial weights everywhere (random init leaves biases and norms at 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module


@pytest.fixture(scope="module")
def timm_teacher():
    teacher = load_teacher(TIMM, random_init=True, model_kwargs=TINY, device="cpu")
    _randomize(teacher.model, 1)
    return teacher


@pytest.fixture(scope="module")
def clip_teacher():
    teacher = load_teacher(OPEN_CLIP, random_init=True, model_kwargs=OPEN_CLIP_TINY, device="cpu")
    _randomize(teacher.model, 2)
    return teacher


def _timm_manual(model, x):
    """Re-run a timm ViT block by block, computing q, k, v from each block's own qkv weights."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    hidden, rel, qkv_out, attn_in = {}, {}, {}, {}
    for i, blk in enumerate(model.blocks):
        hidden[i] = t
        y = blk.norm1(t)
        attn = blk.attn
        b, n, _ = y.shape
        qkv = (y @ attn.qkv.weight.T + attn.qkv.bias).reshape(b, n, 3, attn.num_heads, attn.head_dim)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # [B, H, N, hd]
        q, k = attn.q_norm(q), attn.k_norm(k)
        rel[i + 1] = torch.einsum("bhid,bhjd->bhij", q, k)
        qkv_out[i + 1], attn_in[i + 1] = v, y
        t = blk(t)
    hidden[len(model.blocks)] = t
    return hidden, rel, qkv_out, attn_in, model.norm(t)


def test_timm_shapes_and_metadata(timm_teacher):
    t = timm_teacher
    assert (t.depth, t.num_heads, t.head_dim, t.embed_dim) == (6, 3, 64, 192)
    assert t.grid == (8, 8) and t.num_patches == 64 and t.img_size == 64 and t.num_prefix_tokens == 1
    assert len(t.weights_digest) == 64 and t.weights_source.startswith("random_init")
    out = t.forward_targets(t.normalize(_batch()), relation_layers=(5,), hidden_layers=(0, 2), block_layers=(3,))
    assert out["relations"][5].shape == (2, 3, 65, 65) and out["relations"][5].dtype == torch.float32
    assert out["hidden"][2].shape == (2, 65, 192) and out["block"][3].shape == (2, 65, 192)
    assert out["features"].shape == (2, 65, 192) and out["attention"] == {}


def test_timm_targets_equal_independent_computation(timm_teacher):
    t = timm_teacher
    x = t.normalize(_batch(1))
    out = t.forward_targets(x, relation_layers=range(1, 7), hidden_layers=range(0, 7),
                            attention_layers=(2, 6), block_layers=(1, 6))
    with torch.no_grad():
        hidden, rel, v, attn_in, feats = _timm_manual(t.model, x)
        model_feats = t.model.forward_features(x)
    for layer in range(1, 7):
        torch.testing.assert_close(out["relations"][layer], rel[layer], atol=ATOL, rtol=1e-5)
    for layer in range(0, 7):
        torch.testing.assert_close(out["hidden"][layer], hidden[layer], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out["block"][1], hidden[1], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out["block"][6], hidden[6], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out["features"], model_feats, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out["features"], feats, atol=ATOL, rtol=1e-5)
    # softmax(R * head_dim^-0.5) @ V, projected, reproduces the real attention module's output.
    for layer in (2, 6):
        attn = t.model.blocks[layer - 1].attn
        probs = out["attention"][layer]
        torch.testing.assert_close(probs, torch.softmax(rel[layer] * 64 ** -0.5, -1), atol=1e-6, rtol=1e-5)
        mixed = (probs @ v[layer]).transpose(1, 2).reshape(2, 65, 192)
        with torch.no_grad():
            expected = attn(attn_in[layer])
            ours = attn.proj(attn.norm(mixed))
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-5)


def test_relations_independent_of_batch_composition(timm_teacher):
    t = timm_teacher
    x = t.normalize(_batch(2, b=3))
    full = t.forward_targets(x, relation_layers=(5,), features=False)["relations"][5]
    one = t.forward_targets(x[1:2], relation_layers=(5,), features=False)["relations"][5]
    torch.testing.assert_close(one[0], full[1], atol=ATOL, rtol=1e-5)


def test_teacher_stays_frozen_in_eval(timm_teacher):
    t = timm_teacher
    t.train()
    assert not t.training and not t.model.training
    assert all(not p.requires_grad for p in t.model.parameters())


def test_open_clip_targets_equal_independent_computation(clip_teacher):
    t = clip_teacher
    assert (t.depth, t.num_heads, t.head_dim, t.embed_dim, t.grid) == (3, 2, 32, 64, (8, 8))
    assert t.mean == OPENAI_DATASET_MEAN and t.std == OPENAI_DATASET_STD
    visual = t.model
    x = t.normalize(_batch(3))
    out = t.forward_targets(x, relation_layers=(1, 2, 3), hidden_layers=(0, 3), attention_layers=(1, 3))
    with torch.no_grad():
        # Independent forward: open_clip's own embedding + blocks, q/k/v from the packed in_proj.
        emb = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(2, 1, -1)
        h = visual.ln_pre(torch.cat([cls, emb], 1) + visual.positional_embedding)
        torch.testing.assert_close(out["hidden"][0], h, atol=ATOL, rtol=1e-5)
        for i, blk in enumerate(visual.transformer.resblocks):
            mha = blk.attn
            y = blk.ln_1(h)
            q, k, v = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (z.reshape(2, 65, 2, 32).transpose(1, 2) for z in (q, k, v))
            torch.testing.assert_close(out["relations"][i + 1], q @ k.transpose(-2, -1), atol=ATOL, rtol=1e-5)
            if i + 1 in out["attention"]:
                probs = out["attention"][i + 1]
                # The module's own attention weights and its output, from the same input.
                ref_out, ref_probs = mha(y, y, y, need_weights=True, average_attn_weights=False)
                torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
                mixed = (probs @ v).transpose(1, 2).reshape(2, 65, 64)
                torch.testing.assert_close(mha.out_proj(mixed), ref_out, atol=ATOL, rtol=1e-5)
            h = blk(h)
        torch.testing.assert_close(out["hidden"][3], h, atol=ATOL, rtol=1e-5)
        # Features: the model's own final-norm tokens (output_tokens) and its pooled CLS embedding.
        visual.output_tokens = True
        try:
            pooled, tokens = visual(x)
        finally:
            visual.output_tokens = False
    torch.testing.assert_close(out["features"][:, 1:], tokens, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out["features"][:, 0] @ visual.proj, pooled, atol=ATOL, rtol=1e-5)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = load_teacher(TIMM, random_init=True, model_kwargs=TINY, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    b = load_teacher(TIMM, random_init=True, model_kwargs=TINY, device="cpu")
    assert a.weights_digest == b.weights_digest


def _reference_model(seed=123):
    torch.manual_seed(seed)
    return _randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval(), seed)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "mae_full", "ddp"])
def test_local_checkpoint_gives_identical_targets(tmp_path, fmt):
    model = _reference_model()
    state = model.state_dict()
    if fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(state, path)
    elif fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "mae_full":
        path = tmp_path / "mae_full.pth"
        full = dict(state)
        full["mask_token"] = torch.zeros(1, 1, 192)
        full["decoder_embed.weight"] = torch.randn(128, 192)
        full["decoder_blocks.0.attn.qkv.weight"] = torch.randn(384, 128)
        full["decoder_pred.bias"] = torch.randn(192)
        torch.save({"model": full, "epoch": 799, "args": argparse.Namespace(model="mae_vit_base")}, path)
    else:
        path = tmp_path / "ddp.bin"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    teacher = load_teacher(TIMM, checkpoint=path, model_kwargs=TINY, device="cpu")
    assert teacher.weights_digest == weights_digest(model)
    assert teacher.weights_source == f"checkpoint:{path.name}"
    x = teacher.normalize(_batch(4))
    out = teacher.forward_targets(x, relation_layers=(5,))
    with torch.no_grad():
        _, rel, _, _, _ = _timm_manual(model, x)
        torch.testing.assert_close(out["features"], model.forward_features(x), atol=0, rtol=0)
    torch.testing.assert_close(out["relations"][5], rel[5], atol=ATOL, rtol=1e-5)


def test_open_clip_full_clip_checkpoint(tmp_path, clip_teacher):
    import open_clip

    torch.manual_seed(5)
    clip = _randomize(open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, **OPEN_CLIP_TINY), 5)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    teacher = load_teacher(OPEN_CLIP, checkpoint=path, model_kwargs=OPEN_CLIP_TINY, device="cpu")
    assert teacher.weights_digest == weights_digest(clip.visual) != clip_teacher.weights_digest
    x = teacher.normalize(_batch(5))
    clip.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = clip.visual.eval()(x)
    torch.testing.assert_close(teacher.forward_targets(x)["features"][:, 1:], tokens, atol=ATOL, rtol=1e-5)


def test_checkpoint_with_wrong_keys_names_them(tmp_path):
    state = _reference_model().state_dict()
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(HdpipeError) as err:
        load_teacher(TIMM, checkpoint=path, model_kwargs=TINY, device="cpu")
    message = str(err.value)
    assert "blocks.0.attn.qkv.weight" in message and "blocks.0.attn.qkv_renamed.weight" in message
    assert "bad.pth" in message


def test_checkpoint_file_problems(tmp_path):
    with pytest.raises(HdpipeError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(HdpipeError, match="unsupported suffix"):
        read_checkpoint(tmp_path / "w.npz")
    torch.save({"epoch": 3, "optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "opt.pth")
    with pytest.raises(HdpipeError, match="no state dict"):
        read_checkpoint(tmp_path / "opt.pth")
    with pytest.raises(ConfigError, match="exclude"):
        load_teacher(TIMM, checkpoint=tmp_path / "opt.pth", random_init=True)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_text_file_as_checkpoint_is_one_error_naming_it(tmp_path, suffix):
    """A failed download (an HTML page saved as weights) is a user error naming the file, not a traceback."""
    bad = tmp_path / f"weights{suffix}"
    bad.write_text("<html><body>404 Not Found</body></html>\n")
    with pytest.raises(HdpipeError, match=f"checkpoint '{bad}' (cannot be read as a weights-only torch file|"
                                          "is not a readable safetensors file)"):
        load_teacher(TIMM, checkpoint=bad, model_kwargs=TINY, device="cpu")


def test_student_dir_loads_like_timm(tmp_path):
    model = _reference_model(seed=9)
    folder = tmp_path / "student"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": TINY}))
    teacher = load_teacher(f"student:{folder}", device="cpu")
    assert teacher.weights_digest == weights_digest(model) and teacher.mean == IMAGENET_MEAN
    x = teacher.normalize(_batch(6))
    with torch.no_grad():
        torch.testing.assert_close(teacher.forward_targets(x)["features"], model.forward_features(x), atol=0, rtol=0)
    with pytest.raises(HdpipeError, match="config.json"):
        load_teacher(f"student:{tmp_path / 'nowhere'}", device="cpu")


@pytest.mark.parametrize("spec", ["resnet50", "vit", "foo:bar", "mae2"])
def test_unknown_teacher_lists_choices(spec):
    with pytest.raises(ConfigError) as err:
        load_teacher(spec, random_init=True)
    assert "mae, clip, deit, dino, timm:NAME, open_clip:NAME[:TAG], student:DIR" in str(err.value)


def test_unknown_backend_models():
    with pytest.raises(ConfigError, match="timm has no model 'vit_nonexistent_xyz'"):
        parse_spec("timm:vit_nonexistent_xyz")
    with pytest.raises(ConfigError, match=r"no pretrained tag 'bogus' \(tags: \['vit_tiny_patch16_224.augreg"):
        parse_spec("timm:vit_tiny_patch16_224.bogus")
    with pytest.raises(ConfigError, match="open_clip has no model config 'ViT-Q-99'"):
        parse_spec("open_clip:ViT-Q-99")


@pytest.mark.parametrize("spec, kwargs, message", [
    (TIMM, {**TINY, "bogus_kw": 1}, "model 'vit_tiny_patch16_224' has no argument 'bogus_kw' (TypeError: "),
    (TIMM, {"img_size": -64}, "model 'vit_tiny_patch16_224' cannot be built with model kwargs {'img_size': -64} "
                              "(ValueError: "),
    (OPEN_CLIP, {**OPEN_CLIP_TINY, "vision_cfg": {"bogus": 1}}, "model 'ViT-B-16-quickgelu' has no argument 'bogus'"),
])
def test_model_kwargs_the_model_rejects_name_the_kwarg_model_and_option(spec, kwargs, message):
    with pytest.raises(ConfigError) as e:
        load_teacher(spec, random_init=True, model_kwargs=kwargs, device="cpu")
    assert str(e.value).startswith(message) and "--model-kwargs" in str(e.value) and "\n" not in str(e.value)
    assert e.value.__cause__ is not None  # the constructor's own exception, for --debug


def test_construction_failures_without_user_kwargs_are_not_reworded():
    """Only the user's kwargs make a failure theirs: a constructor bug keeps its own exception."""
    from pipeline.targets.weights import create_with_kwargs

    def broken(**kw):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError, match="a bug"):
        create_with_kwargs(broken, "m", {})
    with pytest.raises(ConfigError, match=r"model 'm' cannot be built with model kwargs \{'depth': 2\}"):
        create_with_kwargs(broken, "m", {"depth": 2})
    for err in (HdpipeError("already one line"), OSError("hub unreachable")):  # pass through: callers word them
        def failing(**kw):
            raise err

        with pytest.raises(type(err), match=str(err)):
            create_with_kwargs(failing, "m", {"depth": 2})


def test_prefix_token_rules():
    with pytest.raises(ConfigError, match="register tokens: True"):
        load_teacher(TIMM, random_init=True, model_kwargs={**TINY, "reg_tokens": 4}, device="cpu")
    with pytest.raises(ConfigError, match="exactly one CLS"):
        load_teacher(TIMM, random_init=True, model_kwargs={**TINY, "class_token": False, "global_pool": "avg"},
                     device="cpu")


def test_non_finite_output_raises_naming_teacher_and_layer():
    teacher = load_teacher(TIMM, random_init=True, model_kwargs=TINY, device="cpu")
    with torch.no_grad():
        teacher.model.blocks[3].attn.qkv.weight[0, 0] = float("nan")
    x = teacher.normalize(_batch(7))
    with pytest.raises(NonFiniteError, match=r"timm:vit_tiny_patch16_224.*relations\[4\]"):
        teacher.forward_targets(x, relation_layers=(4,))
    with pytest.raises(NonFiniteError, match=r"hidden\[5\]"):
        teacher.forward_targets(x, hidden_layers=(1, 5), features=False)
    # Blocks before the bad one are still finite.
    assert torch.isfinite(teacher.forward_targets(x, hidden_layers=(3,), features=False)["hidden"][3]).all()


def test_layer_and_input_validation(timm_teacher):
    x = timm_teacher.normalize(_batch())
    with pytest.raises(ConfigError, match="relation layers"):
        timm_teacher.forward_targets(x, relation_layers=(0,))
    with pytest.raises(ConfigError, match="hidden layers"):
        timm_teacher.forward_targets(x, hidden_layers=(7,))
    with pytest.raises(ConfigError, match="inputs"):
        timm_teacher.forward_targets(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("spec,kwargs", [(TIMM, TINY), ("open_clip:ViT-B-16-quickgelu:openai", OPEN_CLIP_TINY)])
def test_offline_pretrained_error_says_what_to_pass(monkeypatch, spec, kwargs):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub answers "not cached"
    with pytest.raises(HdpipeError, match="--checkpoint PATH.*--random-init"):
        load_teacher(spec, model_kwargs=kwargs, device="cpu")


def test_timm_clip_from_open_clip_checkpoint_matches_open_clip_teacher(tmp_path):
    """`clip` (timm) fed an open_clip checkpoint gives the same targets as `open_clip:...` fed it."""
    import open_clip

    torch.manual_seed(3)
    clip = _randomize(open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, **OPEN_CLIP_TINY), 3)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    a = load_teacher(OPEN_CLIP, checkpoint=path, model_kwargs=OPEN_CLIP_TINY, device="cpu")
    b = load_teacher("clip", checkpoint=path, device="cpu", model_kwargs={
        "img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2, "num_classes": 32})
    assert b.mean == a.mean and b.std == a.std
    x = a.normalize(_batch(8))
    oa = a.forward_targets(x, relation_layers=(2, 3), hidden_layers=(0, 3))
    ob = b.forward_targets(x, relation_layers=(2, 3), hidden_layers=(0, 3))
    for layer in (2, 3):
        torch.testing.assert_close(ob["relations"][layer], oa["relations"][layer], atol=1e-4, rtol=1e-5)
    for layer in (0, 3):
        torch.testing.assert_close(ob["hidden"][layer], oa["hidden"][layer], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ob["features"], oa["features"], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name,model,role,mean", [
    ("mae", "vit_base_patch16_224.mae", "mim", IMAGENET_MEAN),
    ("clip", "vit_base_patch16_clip_quickgelu_224.openai", "disc", OPENAI_DATASET_MEAN),
    ("deit", "deit_base_patch16_224.fb_in1k", "disc", IMAGENET_MEAN),
    ("dino", "vit_base_patch16_224.dino", "disc", IMAGENET_MEAN),
])
def test_teacher_table_matches_the_weights_preprocessing(name, model, role, mean):
    spec = TEACHERS[name]
    assert (spec.backend, spec.model, spec.role, spec.mean) == ("timm", model, role, mean)
    cfg = timm.models.get_pretrained_cfg(model)  # what the published weights were trained with
    assert tuple(cfg.mean) == spec.mean and tuple(cfg.std) == spec.std
    assert cfg.interpolation == spec.interpolation == "bicubic"
    assert parse_spec(f"timm:{model}").role == role


def test_open_clip_spec_preprocessing():
    spec = parse_spec("open_clip:ViT-B-16-quickgelu:openai")
    assert (spec.backend, spec.model, spec.tag, spec.role) == ("open_clip", "ViT-B-16-quickgelu", "openai", "disc")
    assert spec.mean == OPENAI_DATASET_MEAN and spec.std == OPENAI_DATASET_STD
    with pytest.raises(ConfigError, match="pretrained tag"):
        load_teacher("open_clip:ViT-B-16-quickgelu", model_kwargs=OPEN_CLIP_TINY, device="cpu")
