"""Teacher backends: every registered one keeps the `TeacherBackend` Protocol, and a new one plugs in.

For each backend in `specs.BACKENDS` (a case per key; a backend without one fails here): the
Protocol by isinstance, then the real thing on a tiny model: a random-init teacher's geometry and
preprocessing, and a teacher loaded back from a saved random model (the offline checkpoint path; a
student's own export) whose relations equal Q·Kᵀ recomputed from that model family's weights by
hand. The toy backend below (a hand-built ViT under `toy:`) is registered by monkeypatching the
registry only; it loads with `load_teacher` and extracts a tiny store with `stages.extract`.
"""
from __future__ import annotations

import ast
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from pipeline.errors import ConfigError, HdpipeError
from pipeline.targets import specs
from pipeline.targets.backends.protocol import (IMAGENET_MEAN, IMAGENET_STD, Preprocessing, TeacherBackend,
                                                TeacherSpec, ViTGeometry)
from pipeline.targets.teachers import load_teacher
from pipeline.targets.weights import create_with_kwargs, load_into, weights_digest
from toydata import structured_jpeg, write_dataset

ATOL = 2e-5
TIMM_KW = {"img_size": 32, "patch_size": 8, "depth": 3}  # 4x4 patches, 3 heads of 64, 192-d
CLIP_KW = {
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"width": 32, "heads": 2, "layers": 1, "context_length": 8, "vocab_size": 64},
    "embed_dim": 32,
}
TOY_KW = {"img_size": 32, "patch": 8, "dim": 32, "depth": 3, "heads": 2}


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights everywhere (an init leaves biases and norms at 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _batch(seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- Q·Kᵀ by hand, per family


def _heads(z: torch.Tensor, h: int) -> torch.Tensor:
    """[B, N, D] -> [B, H, N, D / H]."""
    b, n, d = z.shape
    return z.reshape(b, n, h, d // h).transpose(1, 2)


@torch.no_grad()
def timm_qk(model, x) -> dict[int, torch.Tensor]:
    """timm ViT: q, k from each block's qkv weights on norm1 of its input, then q_norm / k_norm."""
    t, rel = model.norm_pre(model._pos_embed(model.patch_embed(x))), {}
    for i, blk in enumerate(model.blocks, start=1):
        q, k, _ = F.linear(blk.norm1(t), blk.attn.qkv.weight, blk.attn.qkv.bias).chunk(3, dim=-1)
        h = blk.attn.num_heads
        rel[i] = blk.attn.q_norm(_heads(q, h)) @ blk.attn.k_norm(_heads(k, h)).transpose(-2, -1)
        t = blk(t)
    return rel


@torch.no_grad()
def open_clip_qk(visual, x) -> dict[int, torch.Tensor]:
    """open_clip tower: its own embedding, q, k from the packed in_proj on ln_1 of each block's input."""
    emb = visual.conv1(x).flatten(2).transpose(1, 2)
    t = visual.ln_pre(torch.cat([visual.class_embedding.expand(len(x), 1, -1), emb], 1) + visual.positional_embedding)
    rel = {}
    for i, blk in enumerate(visual.transformer.resblocks, start=1):
        q, k, _ = F.linear(blk.ln_1(t), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
        rel[i] = _heads(q, blk.attn.num_heads) @ _heads(k, blk.attn.num_heads).transpose(-2, -1)
        t = blk(t)
    return rel


@torch.no_grad()
def toy_qk(model, x) -> dict[int, torch.Tensor]:
    """The toy ViT: q, k from each block's qkv weights on norm1 of its input."""
    t = torch.cat([model.cls.expand(len(x), -1, -1), model.patch(x).flatten(2).transpose(1, 2)], 1) + model.pos
    rel = {}
    for i, blk in enumerate(model.blocks, start=1):
        q, k, _ = F.linear(blk.norm1(t), blk.qkv.weight, blk.qkv.bias).chunk(3, dim=-1)
        rel[i] = _heads(q, blk.heads) @ _heads(k, blk.heads).transpose(-2, -1)
        t = blk(t)
    return rel


# ----------------------------------------------------------------------------- the toy backend


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t):  # [B, N, D]
        b, n, d = t.shape
        q, k, v = self.qkv(self.norm1(t)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        t = t + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return t + self.mlp(self.norm2(t))


class ToyViT(nn.Module):
    """A hand-built ViT: patch conv, CLS + learned positions, pre-norm blocks with a fused qkv, final norm."""

    def __init__(self, img_size: int = 32, patch: int = 8, dim: int = 32, depth: int = 3, heads: int = 2):
        super().__init__()
        self.img_size, self.grid, self.dim, self.heads = img_size, img_size // patch, dim, heads
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + self.grid ** 2, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # [B, 3, S, S] -> [B, N, D] after the final norm
        t = torch.cat([self.cls.expand(len(x), -1, -1), self.patch(x).flatten(2).transpose(1, 2)], 1) + self.pos
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)


class ToyBackend:
    """`toy:vit`: what a new backend module would hold, here in the test only."""

    forms = "toy:vit"

    def parse(self, spec: str, rest: str) -> TeacherSpec:
        if rest != "vit":
            raise ConfigError(f"teacher '{spec}': the toy backend has one model, 'vit'")
        return TeacherSpec(spec, "toy", rest, None, "mim", IMAGENET_MEAN, IMAGENET_STD, "bilinear")

    def pretrained(self, spec: TeacherSpec, model_kwargs: dict):
        raise HdpipeError("toy teachers have no hub; pass --checkpoint PATH or --random-init")

    def create(self, spec: TeacherSpec, model_kwargs: dict) -> nn.Module:
        return create_with_kwargs(ToyViT, spec.model, model_kwargs)

    def load_state(self, model: nn.Module, state: dict, source: str) -> None:
        load_into(model, state, source)

    def preprocessing(self, spec: TeacherSpec) -> Preprocessing:
        return Preprocessing(spec.mean, spec.std, spec.interpolation)

    def geometry(self, model: nn.Module, name: str) -> ViTGeometry:
        if not isinstance(model, ToyViT):
            raise ConfigError(f"teacher '{name}' is not a ToyViT")
        return ViTGeometry(tuple(model.blocks), model.heads, model.dim // model.heads, model.dim,
                           (model.grid, model.grid), (model.img_size, model.img_size))

    def hook_qk(self, model: nn.Module, layer: int, sink):
        blk = model.blocks[layer - 1]

        def hook(_module, _inputs, out):  # [B, N, 3D]
            b, n, _ = out.shape
            q, k, _v = out.reshape(b, n, 3, blk.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            sink(layer, q, k)

        return blk.qkv.register_forward_hook(hook)

    def final_tokens(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)


@pytest.fixture
def toy(monkeypatch):
    """The toy backend in the registry, for this test only."""
    monkeypatch.setitem(specs.BACKENDS, "toy", ToyBackend())
    return specs.BACKENDS["toy"]


# ----------------------------------------------------------------------------- a case per backend


@dataclass
class Case:
    spec: str  # what load_teacher is given
    model_kwargs: dict  # for the random-init teacher
    geometry: tuple  # (depth, num_heads, head_dim, embed_dim, grid, img_size)
    reference: nn.Module  # a randomized model of the family, saved where `load` reads it
    load: dict  # load_teacher's other arguments that read `reference` back
    qk: Callable  # (model, x) -> {layer: Q·Kᵀ} by hand
    features: Callable  # (reference, x) -> its final-norm tokens, by the family's own forward


def timm_case(tmp_path: Path) -> Case:
    import timm

    torch.manual_seed(11)
    ref = _randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KW), 11)
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    return Case("timm:vit_tiny_patch16_224", TIMM_KW, (3, 3, 64, 192, (4, 4), 32), ref,
                {"checkpoint": path, "model_kwargs": TIMM_KW}, timm_qk, lambda m, x: m.forward_features(x))


def open_clip_case(tmp_path: Path) -> Case:
    import open_clip

    torch.manual_seed(12)
    clip = _randomize(open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, **CLIP_KW), 12)
    path = tmp_path / "clip.safetensors"  # a whole CLIP: the backend keeps the image tower
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))

    def tokens(visual, x):
        visual.output_tokens = True
        try:
            pooled, patches = visual(x)
        finally:
            visual.output_tokens = False
        return patches  # [B, P, D]: every token but CLS, after ln_post

    return Case("open_clip:ViT-B-16-quickgelu", CLIP_KW, (3, 2, 32, 64, (4, 4), 32), clip.visual,
                {"checkpoint": path, "model_kwargs": CLIP_KW}, open_clip_qk, tokens)


def student_case(tmp_path: Path) -> Case:
    import timm

    torch.manual_seed(13)
    ref = _randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KW), 13)
    folder = tmp_path / "student"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"model": "vit_tiny_patch16_224", "model_kwargs": TIMM_KW, "mean": [0.5, 0.5, 0.5],
              "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    (folder / "config.json").write_text(json.dumps(config))
    return Case(f"student:{folder}", {}, (3, 3, 64, 192, (4, 4), 32), ref, {}, timm_qk,
                lambda m, x: m.forward_features(x))


def toy_case(tmp_path: Path) -> Case:
    torch.manual_seed(14)
    ref = _randomize(ToyViT(**TOY_KW), 14)
    path = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return Case("toy:vit", TOY_KW, (3, 2, 16, 32, (4, 4), 32), ref, {"checkpoint": path, "model_kwargs": TOY_KW},
                toy_qk, lambda m, x: m(x))


CASES = {"timm": timm_case, "open_clip": open_clip_case, "student": student_case}


def test_every_registered_backend_has_a_case_here():
    assert set(CASES) == set(specs.BACKENDS), "a new backend needs a case in CASES (its family's Q·Kᵀ by hand)"


def _check_backend(case: Case, backend) -> None:
    assert isinstance(backend, TeacherBackend)
    spec = specs.parse_spec(case.spec)
    assert specs.backend_of(spec) is backend
    pre = backend.preprocessing(spec)
    assert isinstance(pre, Preprocessing) and len(pre.mean) == len(pre.std) == 3 and pre.interpolation

    fresh = load_teacher(case.spec, random_init=True, model_kwargs=case.model_kwargs, device="cpu")
    assert (fresh.depth, fresh.num_heads, fresh.head_dim, fresh.embed_dim, fresh.grid, fresh.img_size) == case.geometry
    assert set(fresh.preprocessing) == {"img_size", "mean", "std", "interpolation"}
    assert fresh.preprocessing["img_size"] == case.geometry[-1]
    assert (fresh.mean, fresh.std, fresh.interpolation) == (tuple(pre.mean), tuple(pre.std), pre.interpolation)
    assert fresh.weights_source == "random_init:seed0"
    _randomize(fresh.model, 3)  # a random init leaves norms at 1 and biases at 0
    x = fresh.normalize(_batch(1))
    out = fresh.forward_targets(x, relation_layers=(1, 3), attention_layers=(2,))
    want = case.qk(fresh.model, x)
    for layer in (1, 3):
        torch.testing.assert_close(out["relations"][layer], want[layer], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out["attention"][2], torch.softmax(want[2] * fresh.head_dim ** -0.5, -1),
                               atol=1e-6, rtol=1e-5)

    saved = load_teacher(case.spec, device="cpu", **case.load)  # the saved model read back offline
    assert saved.weights_digest == weights_digest(case.reference)
    x = saved.normalize(_batch(2))
    out = saved.forward_targets(x, relation_layers=(1, 2, 3))
    want = case.qk(case.reference, x)
    for layer in (1, 2, 3):
        torch.testing.assert_close(out["relations"][layer], want[layer], atol=ATOL, rtol=1e-5)
    with torch.no_grad():
        tokens = case.features(case.reference, x)
    torch.testing.assert_close(out["features"][:, -tokens.shape[1]:], tokens, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("prefix", sorted(CASES))
def test_registered_backend_keeps_the_protocol(prefix, tmp_path):
    _check_backend(CASES[prefix](tmp_path), specs.BACKENDS[prefix])


def test_short_names_are_timm_specs():
    for name, spec in specs.TEACHERS.items():
        assert spec.name == name and spec.backend == "timm" and specs.parse_spec(name) is spec


def test_teachers_module_uses_backends_only_through_the_protocol():
    """teachers.py imports no library's model code and no backend module: it reads `TeacherBackend` only."""
    path = Path(__file__).resolve().parents[1] / "pipeline" / "targets" / "teachers.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not {m for m in imported if m.split(".")[0] in ("timm", "open_clip")}
    assert {m for m in imported if m.startswith("pipeline.targets.backends")} == {"pipeline.targets.backends.protocol"}


# ----------------------------------------------------------------------------- the extension point


def test_toy_backend_plugs_in_through_the_registry(toy, tmp_path):
    assert "toy:vit" in specs.spec_forms()
    _check_backend(toy_case(tmp_path), toy)
    with pytest.raises(HdpipeError, match="no hub"):
        load_teacher("toy:vit", model_kwargs=TOY_KW, device="cpu")
    with pytest.raises(ConfigError, match="model 'vit' has no argument 'bogus'"):
        load_teacher("toy:vit", random_init=True, model_kwargs={"bogus": 1}, device="cpu")


def test_unregistered_prefix_lists_every_registered_form(toy):
    with pytest.raises(ConfigError) as err:
        load_teacher("nope:vit")
    assert str(err.value).endswith("timm:NAME, open_clip:NAME[:TAG], student:DIR, toy:vit")


def test_toy_backend_extracts_a_store(toy, tmp_path):
    """`stages.extract` with a `toy:` teacher: a complete MIM store whose relations are the toy's Q·Kᵀ."""
    from pipeline.targets.store import TargetStore
    from pipeline.data.views import View, render
    from stages.extract import ExtractConfig, extract
    from stages.verify import VerifyConfig, verify

    rng = np.random.default_rng(0)
    manifest = write_dataset(tmp_path / "data", [structured_jpeg(rng) for _ in range(6)], 4)
    case = toy_case(tmp_path)
    url = extract(ExtractConfig(manifest=manifest, teacher="toy:vit", checkpoint=str(case.load["checkpoint"]),
                                model_kwargs=TOY_KW, views=1, tokens="all", targets=str(tmp_path / "targets"),
                                batch_size=4, device="cpu", progress=False))
    store = TargetStore.open(url)
    assert store.missing_shards() == [] and store.attrs["teacher"] == "toy:vit"
    assert store.attrs["weights_digest"] == weights_digest(case.reference)
    assert store.attrs["preprocessing"]["interpolation"] == "bilinear"
    rows = {name: np.concatenate([store.read_shard(k, [name])[name] for k in range(store.num_shards)])
            for name in ("views", "relations")}
    images = {}
    for tar_path in sorted(Path(manifest).parent.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            images.update({int(m.name.split(".")[0]): tar.extractfile(m).read()
                           for m in tar.getmembers() if m.name.endswith(".jpg")})
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    x = torch.stack([(render(Image.open(io.BytesIO(images[i])).convert("RGB"), View.from_row(rows["views"][i, 0]),
                             32, "bilinear") - mean) / std for i in range(6)])
    want = toy_qk(case.reference, x)
    got = rows["relations"][:, 0]  # [N, layers (2, 3), H, T, T], fp16, every token
    for j, layer in enumerate(store.attrs["relation_layers"]):
        diff = np.linalg.norm(got[:, j] - want[layer].numpy()) / np.linalg.norm(want[layer].numpy())
        assert diff < 2e-3, (layer, diff)
    assert verify(VerifyConfig(store=url, samples=4, device="cpu"))["ok"]  # rebuilt from the store's own attributes
