"""`evaluate` and `analyze` stages, plots and commands on real tiny timm models and real tar shards.

The labeled split is built here (coloured, textured images in real webdataset tars with manifests)
so these tests depend only on the shard/manifest writers, not on the bundled sample's size.
"""
from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.eval import analysis
from pipeline.data.manifest import Manifest, ShardInfo, write_manifest
from pipeline.eval.probe import knn_accuracy, linear_probe
from pipeline.data.tars import SampleRecord, write_dataset

TINY = {"img_size": 64, "patch_size": 8, "depth": 6}  # 8x8 = 64 patches, 3 heads of 64, 192-d
TIMM = "timm:vit_tiny_patch16_224"
NUM_CLASSES = 6


def _image(label: int, i: int, rng: np.random.Generator) -> bytes:
    """A class-dependent picture: a base colour per class plus noise and a per-class stripe period."""
    w, h = int(rng.integers(56, 96)), int(rng.integers(56, 96))
    base = np.array([(label * 40) % 256, (label * 97) % 256, (255 - label * 40) % 256], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = 60 * np.sin(2 * np.pi * xx / (4 + 3 * label))[..., None]
    img = np.clip(base + stripes + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _labeled_manifest(folder: Path, name: str, per_class: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    records = [SampleRecord(name=f"c{c}/{i}.png", data=_image(c, i, rng), ext="png", label=c, source="synthetic")
               for i in range(per_class) for c in range(NUM_CLASSES)]
    shards, _, _ = write_dataset(records, name=name, out_dir=str(folder / "shards"), shard_size=16, progress=False)
    manifest = Manifest(
        name=name, shard_size=16, total=len(records),
        shards=tuple(ShardInfo(url=str(Path(u).relative_to(folder)), count=c, first_index=f, sha256=s)
                     for u, c, f, s in shards),
        class_map={f"c{c}": c for c in range(NUM_CLASSES)}, source="synthetic test split",
    )
    path = folder / f"{name}.json"
    write_manifest(manifest, path)
    return str(path)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    return {"train": _labeled_manifest(folder, "probe-train", 6, seed=0),
            "test": _labeled_manifest(folder, "probe-test", 3, seed=1)}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A stage-two export written by distill's own exporter (here a depth-4 random timm ViT)."""
    import timm

    from pipeline.train.checkpoint import export_student

    folder = tmp_path_factory.mktemp("run") / "student"
    kwargs = {"img_size": 64, "patch_size": 8, "depth": 4}
    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    return export_student(model.state_dict(), "vit_tiny_patch16_224", kwargs, folder)


# ----------------------------------------------------------------------------- pure pieces


def test_center_view_geometry():
    from pipeline.eval.subjects import center_view

    # 200x100 image, left half black / right half white: size 50 at crop_pct 0.5 -> resize short side to
    # 100 (no-op), crop the central 50x50 = columns 75..125, straddling the edge at column 100.
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    arr[:, 100:] = 255
    out = center_view(Image.fromarray(arr), 50, crop_pct=0.5, interpolation="nearest")
    assert out.shape == (3, 50, 50) and out.dtype == torch.float32
    assert torch.all(out[:, :, :25] == 0) and torch.all(out[:, :, 25:] == 1)
    # crop_pct 1.0 on a square image is a plain resize
    sq = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    ref = torch.from_numpy(np.asarray(sq.resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(center_view(sq, 16, crop_pct=1.0), ref)


def _fake_models():
    rng = np.random.default_rng(0)

    def model(depth, heads):
        return {"layers": list(range(1, depth + 1)),
                "attention_distance": rng.uniform(5, 40, (depth, heads)).tolist(),
                "nmi": rng.uniform(0, 1, (depth, heads)).tolist(),
                "entropy": rng.uniform(1, 4, (depth, heads)).tolist(),
                "spectrum_token": [np.sort(-rng.uniform(0, 5, 10))[::-1].tolist() for _ in range(depth)],
                "spectrum_image": [np.sort(-rng.uniform(0, 5, 6))[::-1].tolist() for _ in range(depth)]}

    return {"student": model(4, 3), "teacher": model(6, 3), "random": model(6, 2)}


def test_plots_one_series_per_model(tmp_path):
    from pipeline.eval import plots

    models = _fake_models()
    paths = plots.write_all(models, tmp_path)
    for name, p in paths.items():
        assert p.is_file() and p.stat().st_size > 0, name
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for metric in plots.PER_HEAD:
        fig = plots.plot_per_head(models, metric, tmp_path / "x.png")
        ax = fig.axes[0]
        labelled = [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        assert labelled == list(models)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(models)
        assert len(ax.collections) == len(models)  # one scatter (all heads) per model
        dots = [c.get_offsets().shape[0] for c in ax.collections]
        assert dots == [len(m["layers"]) * len(m["nmi"][0]) for m in models.values()]
    fig = plots.plot_spectrum_summary(models, tmp_path / "y.png")
    for ax in fig.axes:
        assert [ln.get_label() for ln in ax.get_lines()] == list(models)
    fig = plots.plot_spectra(models, "token", tmp_path / "z.png")
    assert [ax.get_title() for ax in fig.axes] == list(models)
    assert [len(ax.get_lines()) for ax in fig.axes] == [len(m["layers"]) for m in models.values()]
    with open(paths["nmi_csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["layer", *models]
    assert len(rows) == 1 + 6
    assert rows[5][1] == ""  # the depth-4 student has no layer 5
    assert float(rows[1][2]) == pytest.approx(np.mean(models["teacher"]["nmi"][0]))
    with open(paths["head_distance_csv"]) as f:
        assert sum(1 for _ in f) == 1 + sum(len(m["layers"]) * len(m["nmi"][0]) for m in models.values())


# ----------------------------------------------------------------------------- real model, real shards


def _independent_forward(teacher, x):
    """Softmax attention and block outputs captured from a copy of the timm model with fused_attn=False."""
    model = copy.deepcopy(teacher.model).eval()
    attn, blocks, handles = {}, {}, []
    for i, blk in enumerate(model.blocks, start=1):
        blk.attn.fused_attn = False
        # attn_drop receives softmax(q·kᵀ·scale) in timm's unfused path (identity in eval mode)
        handles.append(blk.attn.attn_drop.register_forward_hook(
            lambda m, a, y, i=i: attn.__setitem__(i, a[0].detach())))
        handles.append(blk.register_forward_hook(lambda m, a, y, i=i: blocks.__setitem__(i, y.detach())))
    with torch.no_grad():
        model.forward_features(x)
    for h in handles:
        h.remove()
    return attn, blocks


def test_analyze_matches_independently_extracted_attention(split):
    from pipeline.targets.teachers import load_teacher
    from pipeline.eval.properties import analyze_model
    from pipeline.eval.subjects import center_view, iter_images

    teacher = load_teacher(TIMM, random_init=True, model_kwargs=TINY, device="cpu")
    got = analyze_model(teacher, split["test"], "tiny", num_images=7, batch_size=3, progress=False)
    assert got["layers"] == [1, 2, 3, 4, 5, 6] and got["images"] == 7 and got["grid"] == [8, 8]

    images = [center_view(im, 64) for im, _, _ in iter_images(split["test"], limit=7, progress=False)]
    attn, blocks = _independent_forward(teacher, teacher.normalize(torch.stack(images)))
    for i, layer in enumerate(got["layers"]):
        a = attn[layer]  # [7, 3, 65, 65]
        assert a.shape == (7, 3, 65, 65)
        np.testing.assert_allclose(got["attention_distance"][i], analysis.attention_distance(a, (8, 8), 8.0).numpy(),
                                   rtol=1e-4)
        np.testing.assert_allclose(got["nmi"][i], analysis.attention_nmi(a).numpy(), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(got["entropy"][i], analysis.attention_entropy(a).numpy(), rtol=1e-4)
        # spectra from numpy's SVD of the captured block outputs
        t = blocks[layer].double().numpy()  # [7, 65, 192]
        rel = []
        for img in t:
            p = img[1:] - img[1:].mean(0)
            s = np.linalg.svd(p, compute_uv=False)[:63]  # centered 64 tokens: rank <= 63
            rel.append(np.maximum(np.log(s) - np.log(s[0]), analysis.LOG_SV_FLOOR))
        np.testing.assert_allclose(got["spectrum_token"][i], np.mean(rel, 0), atol=2e-3)
        emb = t[:, 1:].mean(1)
        s = np.linalg.svd(emb - emb.mean(0), compute_uv=False)[:6]  # centered 7 images: rank <= 6
        np.testing.assert_allclose(got["spectrum_image"][i],
                                   np.maximum(np.log(s) - np.log(s[0]), analysis.LOG_SV_FLOOR), atol=2e-3)
    # a layer subset (unsorted, repeated) gives the same numbers for those layers, batch size aside
    sub = analyze_model(teacher, split["test"], "tiny", num_images=7, layers=(6, 2, 2), batch_size=7, progress=False)
    assert sub["layers"] == [2, 6]
    for key in ("attention_distance", "nmi", "entropy", "spectrum_token", "spectrum_image"):
        np.testing.assert_allclose(sub[key], [got[key][1], got[key][5]], rtol=1e-4, atol=1e-5)
    # attention distance can be no larger than the largest patch-center distance on the 64-px input
    assert max(max(d) for d in got["attention_distance"]) < 7 * 8 * 2 ** 0.5


def test_evaluate_matches_independent_probe(split, tmp_path):
    from pipeline.targets.teachers import load_teacher
    from pipeline.eval.subjects import center_view, iter_images
    from stages.evaluate import EvaluateConfig, evaluate

    out = tmp_path / "m.json"
    cfg = EvaluateConfig(model=TIMM, random_init=True, model_kwargs=TINY, train_manifest=split["train"],
                         test_manifest=split["test"], pooling="mean", k=5, device="cpu", out=str(out),
                         batch_size=8, progress=False)
    metrics = evaluate(cfg)
    on_disk = json.loads(out.read_text())
    assert on_disk["knn"] == metrics["knn"] and on_disk["linear"] == metrics["linear"]
    assert (out.parent / "m.config.yaml").is_file()
    assert metrics["n_train"] == 36 and metrics["n_test"] == 18 and metrics["num_classes"] == NUM_CLASSES
    assert set(metrics["knn"]) == {"k", "temperature", "top1", "top5"}

    # Independent path: timm's forward_features on the same center views, mean over patch tokens.
    teacher = load_teacher(TIMM, random_init=True, model_kwargs=TINY, device="cpu")

    def embed(path):
        ims, labels = zip(*[(center_view(im, 64), lab) for im, lab, _ in iter_images(path, progress=False)])
        with torch.no_grad():
            tokens = teacher.model.forward_features(teacher.normalize(torch.stack(ims)))
        return tokens[:, 1:].mean(1), torch.tensor(labels)

    xtr, ytr = embed(split["train"])
    xte, yte = embed(split["test"])
    knn = knn_accuracy(xtr, ytr, xte, yte, k=5, temperature=0.07)
    lin = linear_probe(xtr, ytr, xte, yte)
    assert metrics["knn"]["top1"] == pytest.approx(knn[1]) and metrics["knn"]["top5"] == pytest.approx(knn[5])
    assert metrics["linear"]["top1"] == pytest.approx(lin[1], abs=1 / 18 + 1e-9)
    # the classes are visibly different pictures: even random features beat chance (1/6) by far
    assert metrics["knn"]["top1"] > 0.5


def test_analyze_command_overlays_student_and_teacher(split, student_dir, tmp_path):
    from pipeline.cli import main

    out_dir = tmp_path / "analyze"
    rc = main(["analyze", "--model", f"student:{student_dir}", "--model", TIMM, "--random-init",
               "--model-kwargs", json.dumps(TINY), "--manifest", split["test"], "--num-images", "6",
               "--batch-size", "4", "--device", "cpu", "--out-dir", str(out_dir), "--no-progress"])
    assert rc == 0
    doc = json.loads((out_dir / "analysis.json").read_text())
    labels = list(doc["models"])
    assert labels == [f"student-{student_dir.parent.name}", "vit_tiny_patch16_224-random"]
    student, teacher = (doc["models"][k] for k in labels)
    assert student["layers"] == [1, 2, 3, 4] and teacher["layers"] == [1, 2, 3, 4, 5, 6]
    assert len(student["nmi"][0]) == 3 and len(student["spectrum_image"][0]) == 5  # centered 6 images: rank <= 5
    assert student["random_init"] is False and teacher["random_init"] is True
    for name in ("attention_distance", "nmi", "entropy", "spectrum_token", "spectrum_image", "spectrum_summary"):
        png = out_dir / f"{name}.png"
        assert png.stat().st_size > 1000
    with open(out_dir / "entropy.csv") as f:
        assert next(csv.reader(f)) == ["layer", *labels]
    assert (out_dir / "analyze.config.yaml").is_file()


def test_evaluate_command_reads_config_section(split, student_dir, tmp_path):
    from pipeline.cli import main

    params = tmp_path / "params.yaml"
    out = tmp_path / "student.json"
    params.write_text(
        f"evaluate:\n  model: student:{student_dir}\n  train_manifest: {split['train']}\n"
        f"  test_manifest: {split['test']}\n  k: 3\n  device: cpu\n  out: {out}\n  progress: false\n")
    assert main(["evaluate", "--config", str(params), "--pooling", "mean"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["model"] == f"student:{student_dir}" and metrics["knn"]["k"] == 3 and metrics["pooling"] == "mean"
    assert 0.0 <= metrics["knn"]["top1"] <= metrics["knn"]["top5"] <= 1.0
    # The student's own exported weights were used: the same k-NN on timm's forward of that export agrees.
    import timm
    from pipeline.eval.subjects import center_view, iter_images

    exported = json.loads((student_dir / "config.json").read_text())
    model = timm.create_model(exported["model"], checkpoint_path=str(student_dir / "model.safetensors"),
                              **exported["model_kwargs"]).eval()
    mean, std = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                 torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def embed(path):
        ims, labels = zip(*[(center_view(im, 64), lab) for im, lab, _ in iter_images(path, progress=False)])
        with torch.no_grad():
            return model.forward_features((torch.stack(ims) - mean) / std)[:, 1:].mean(1), torch.tensor(labels)

    want = knn_accuracy(*embed(split["train"]), *embed(split["test"]), k=3)
    assert metrics["knn"]["top1"] == pytest.approx(want[1]) and metrics["knn"]["top5"] == pytest.approx(want[5])


@pytest.mark.parametrize("argv,needle", [
    (["evaluate"], "needs a model"),
    (["evaluate", "--model", "student:x", "--random-init"], "teachers only"),
    (["analyze"], "at least one model"),
    (["analyze", "--model", "timm:a", "--model", "timm:b", "--checkpoint", "w.pth"], "exactly one teacher"),
    (["analyze", "--model", "timm:a", "--label", "x", "--label", "y"], "one --label per --model"),
])
def test_user_errors_are_one_line(argv, needle, capsys):
    from pipeline.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_more_neighbours_than_reference_images_is_an_error(split):
    from pipeline.errors import ConfigError
    from stages.evaluate import EvaluateConfig, evaluate

    n = 6 * NUM_CLASSES
    cfg = EvaluateConfig(model="timm:vit_tiny_patch16_224", random_init=True, model_kwargs={"img_size": 32},
                         train_manifest=split["train"], test_manifest=split["test"], k=n + 1, progress=False)
    with pytest.raises(ConfigError, match=f"k={n + 1} neighbours but .*probe-train.json holds {n} reference images"):
        evaluate(cfg)


def test_finetune_learns_a_separable_set(split, tmp_path):
    """End-to-end fine-tuning of a random-init tiny ViT on the synthetic 6-class set (colour and
    stripe period per class): test top-1 well above chance (1/6) where the same run with an lr too
    small to move anything stays near chance (measured 0.0-0.33 over seeds; trained: 1.0), its
    train loss falls, and a rerun gives the same numbers."""
    from dataclasses import replace

    from stages.evaluate import EvaluateConfig, evaluate

    cfg = EvaluateConfig(model="timm:vit_tiny_patch16_224", random_init=True,
                         model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
                         train_manifest=split["train"], test_manifest=split["test"], k=5, device="cpu",
                         progress=False, out=str(tmp_path / "ft.json"), finetune_epochs=4, finetune_batch_size=12,
                         finetune_lr=4e-3, finetune_warmup_epochs=1.0)
    got = evaluate(cfg)["finetune"]
    assert json.loads((tmp_path / "ft.json").read_text())["finetune"]["top1"] == got["top1"]
    frozen = evaluate(replace(cfg, finetune_lr=1e-12, out=str(tmp_path / "frozen.json")))["finetune"]
    assert got["epochs"] == 4 and got["top1"] >= 1 / NUM_CLASSES + 0.5 and frozen["top1"] <= 0.5, (got, frozen)
    assert got["train_loss"] < frozen["train_loss"] - 0.5
    again = evaluate(cfg)["finetune"]
    assert again["top1"] == got["top1"] and again["train_loss"] == got["train_loss"]


def test_embedding_keeps_no_batch_of_tokens_alive(split, monkeypatch):
    """embed_manifest keeps one [D] row per image, not a view into its batch's [B, N, D] tokens (which
    had made evaluate's memory grow ~N times faster than its embeddings with the labeled split)."""
    from pipeline.eval.subjects import embed_manifest
    from pipeline.targets.teachers import load_teacher

    teacher = load_teacher(TIMM, random_init=True, model_kwargs=TINY, device="cpu")
    cat, held = torch.cat, []

    def watched_cat(tensors, *a, **kw):  # the per-batch embeddings [b, D] just before they are joined
        held.extend((t.untyped_storage().nbytes(), t.numel() * t.element_size()) for t in tensors if t.dim() == 2)
        return cat(tensors, *a, **kw)

    monkeypatch.setattr(torch, "cat", watched_cat)
    for pooling in ("cls", "mean"):
        held.clear()
        x, _ = embed_manifest(teacher, split["train"], torch.device("cpu"), pooling=pooling, batch_size=8,
                              progress=False)
        assert x.shape == (36, teacher.model.embed_dim) and len(held) == 5, pooling
        assert all(storage == own for storage, own in held), (pooling, held)
