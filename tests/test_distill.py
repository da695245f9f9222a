"""`distill` end to end on real tars and real stores made by `stages.extract` (tiny random-init timm
teachers), with a tiny timm student: outputs, export, no teacher built, resume after SIGKILL, DDP,
cached-vs-online loss equivalence, and every bad input the issue lists."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.errors import ConfigError, HdpipeError, NonFiniteError, StoreError
from toydata import feed_one_process_both_ranks, structured_jpeg, write_dataset
from stages.distill import DistillConfig, distill

TEACHER_KW = {"img_size": 64, "patch_size": 8, "depth": 6}  # 64 patches, 3 heads, 192-d, L = 6
DISC_KW = {"img_size": 64, "patch_size": 8, "depth": 2}
STUDENT_KW = {"img_size": 64, "patch_size": 8, "depth": 4}  # shallower than the teacher: layers 4,5 -> 2,3
SHARD = 8
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _dataset(folder: Path, n: int = 24) -> str:
    rng = np.random.default_rng(0)
    return write_dataset(folder, [structured_jpeg(rng, (72, 110)) for _ in range(n)], SHARD)


def _extract(manifest: str, targets: Path, name: str, role: str, **kw) -> str:
    from stages.extract import ExtractConfig, extract

    if role == "mim":
        base = dict(teacher="timm:vit_tiny_patch16_224", role="mim", model_kwargs=TEACHER_KW, views=1)
    else:
        base = dict(teacher="timm:deit_tiny_patch16_224", role="disc", model_kwargs=DISC_KW,
                    mim_store=str(targets / "mim.zarr"))
    base.update(manifest=manifest, random_init=True, targets=str(targets), name=name, batch_size=16,
                device="cpu", progress=False)
    base.update(kw)
    return extract(ExtractConfig(**base))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """24 images in 3 tar shards; a MIM store over all tokens (any masking) and a disc store."""
    root = tmp_path_factory.mktemp("distill")
    manifest = _dataset(root / "data")
    mim = _extract(manifest, root / "targets", "mim", "mim", tokens="all", extra_targets=("attention",))
    disc = _extract(manifest, root / "targets", "disc", "disc")
    return {"root": root, "manifest": manifest, "mim": mim, "disc": disc}


def _cfg(world, tmp_path, **kw) -> DistillConfig:
    base = dict(manifest=world["manifest"], mim_store=world["mim"], disc_store=world["disc"],
                model="vit_tiny_patch16_224", model_kwargs=STUDENT_KW, epochs=2, batch_size=4, workers=0,
                base_lr=0.05, warmup_epochs=0.5, runs_dir=str(tmp_path / "runs"), name="t",
                checkpoint_every=2, device="cpu")
    base.update(kw)
    return DistillConfig(**base)


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in _log(run_dir) if "event" not in r]


def test_distill_outputs_and_export_loads_in_timm(world, tmp_path):
    import timm
    from safetensors.torch import load_file

    from pipeline.train.checkpoint import load_checkpoint
    from stages.distill import build_student, target_sources

    cfg = _cfg(world, tmp_path)
    run = distill(cfg)
    rows = _steps(run)
    # 24 samples / batch 4 = 6 steps per epoch (1 rank), 2 epochs
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["epoch"] for r in rows] == [0] * 6 + [1] * 6
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("loss", "loss_features", "loss_relations", "lr", "images_per_s"))
        assert r["loss"] == pytest.approx(r["loss_features"] + r["loss_relations"], rel=1e-5)
    csv = (run / "plots" / "loss.csv").read_text().splitlines()
    assert csv[0].split(",")[:4] == ["step", "epoch", "lr", "loss"] and len(csv) == 13
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 12 and np.isfinite(metrics["loss"])
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model_kwargs"] == STUDENT_KW and resolved["alpha"] == 1.0
    env = json.loads((run / "env.json").read_text())
    assert env["git_sha"] and env["torch"] == torch.__version__ and env["global_batch"] == 4

    # export: the encoder without a classifier; timm loads it strictly and gives the trained features
    export = run / "student"
    exported = json.loads((export / "config.json").read_text())
    assert exported["model"] == "vit_tiny_patch16_224" and exported["model_kwargs"] == {**STUDENT_KW, "num_classes": 0}
    assert exported["head"].startswith("none")
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, **exported["model_kwargs"])
    data_cfg = timm.data.resolve_data_config({}, model=fresh)  # the normalization the student was trained with
    assert exported["mean"] == pytest.approx(list(data_cfg["mean"]))
    assert exported["std"] == pytest.approx(list(data_cfg["std"]))
    weights = load_file(str(export / "model.safetensors"))
    assert not [k for k in weights if k.startswith("head.")]  # no untrained classifier travels with it
    res = fresh.load_state_dict(weights, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    loaded = timm.create_model("vit_tiny_patch16_224", pretrained=False,
                               checkpoint_path=str(export / "model.safetensors"), **exported["model_kwargs"]).eval()
    # the README's fine-tuning call: a new 10-class head, every encoder weight from the export
    tuned = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10, **STUDENT_KW,
                              pretrained_cfg_overlay=dict(file=str(export / "model.safetensors"), num_classes=0))
    assert tuned.head.out_features == 10
    for k, v in weights.items():
        torch.testing.assert_close(tuned.state_dict()[k], v, rtol=0, atol=0)

    student = build_student(cfg, target_sources(cfg).shapes())
    student.load_state_dict(load_checkpoint(str(run / "checkpoints" / "last.pt"))["model"])
    student.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trained = student(x, torch.arange(64).expand(2, -1))["tokens"]
        torch.testing.assert_close(loaded.forward_features(x), trained, rtol=1e-5, atol=1e-5)
    from pipeline.targets.teachers import load_teacher  # the export as an evaluation/analysis subject

    subject = load_teacher(f"student:{export}", device="cpu")
    assert subject.mean == pytest.approx(tuple(exported["mean"]))
    torch.testing.assert_close(subject.forward_targets(x)["features"], trained, rtol=1e-5, atol=1e-5)
    init = _initial_student(cfg)
    assert not torch.allclose(init.vit.blocks[0].attn.qkv.weight, loaded.blocks[0].attn.qkv.weight)


def _initial_student(cfg):
    """The student as initialized (seeded like distill), to show training moved the weights."""
    from stages.distill import build_student, target_sources

    torch.manual_seed(cfg.seed)
    return build_student(cfg, target_sources(cfg).shapes())


def test_distill_never_builds_a_teacher(world, tmp_path, monkeypatch):
    import open_clip
    import timm

    import pipeline.targets.teachers

    def refuse(*a, **k):
        raise AssertionError(f"a teacher was built: {a} {k}")

    monkeypatch.setattr(pipeline.targets.teachers, "load_teacher", refuse)
    for name in [n for n in dir(open_clip) if n.startswith("create_model")]:
        monkeypatch.setattr(open_clip, name, refuse)
    real = timm.create_model

    def only_student(name, *a, **k):
        if name != "vit_tiny_patch16_224" or k.get("pretrained") or k.get("depth") != STUDENT_KW["depth"]:
            raise AssertionError(f"timm.create_model({name!r}, {k}) is not the student")
        return real(name, *a, **k)

    monkeypatch.setattr(timm, "create_model", only_student)
    monkeypatch.setattr(timm.models, "create_model", only_student)
    run = distill(_cfg(world, tmp_path, epochs=1))
    assert len(_steps(run)) == 6


@pytest.mark.parametrize(
    "kw",
    [
        dict(teachers="disc_only"),
        dict(teachers="mim_only", mim_target="attention"),
        dict(masking="random", relation_layers=(5,), alpha=0.5, accum_steps=2, clip_grad=1.0),
    ],
    ids=["disc_only", "mim_only-attention", "random-mask-accum"],
)
def test_ablation_options_train(world, tmp_path, kw):
    cfg = _cfg(world, tmp_path, epochs=1, **kw)
    rows = _steps(distill(cfg))
    assert len(rows) == 6 // cfg.accum_steps
    if cfg.teachers == "disc_only":  # a term the mode does not use is not logged
        assert all("loss_relations" not in r and r["loss"] == r["loss_features"] for r in rows)
    if cfg.teachers == "mim_only":
        assert all("loss_features" not in r and r["loss"] == r["loss_relations"] > 0 for r in rows)


def test_loss_decreases_without_nan(world, tmp_path, capfd):
    rows = _steps(distill(_cfg(world, tmp_path, epochs=6, base_lr=0.1, warmup_epochs=1, checkpoint_every=0,
                                print_every=4)))
    # Never silent for minutes: a progress line every 4 steps and one per epoch end, with ETA.
    err = capfd.readouterr().err
    # 6 epochs over the store's 1 view: within the measured safe range (32 showings), so no warning
    assert "distill t: each stored view is shown ~6 times (6 epochs over 1 stored view(s))\n" in err
    lines = [ln for ln in err.splitlines() if ln.startswith("distill t: epoch")]
    assert len(lines) == 36 // 4 + 6, lines
    assert "step 4/36 loss " in lines[0] and "img/s" in lines[0] and "ETA " in lines[0]
    assert sum("epoch end" in ln for ln in lines) == 6
    assert len(rows) == 36 and all(np.isfinite(r["loss"]) for r in rows)
    first = np.mean([r["loss"] for r in rows[:6]])
    last = np.mean([r["loss"] for r in rows[-6:]])
    assert last < 0.8 * first, (first, last)


# ----------------------------------------------------------------------------- resume
def _params_file(world, tmp_path, name, **kw) -> Path:
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in
           dict(manifest=world["manifest"], mim_store=world["mim"], disc_store=world["disc"],
                model="vit_tiny_patch16_224", model_kwargs=STUDENT_KW, epochs=3, batch_size=4, workers=0,
                base_lr=0.05, warmup_epochs=0.5, runs_dir=str(tmp_path / "runs"), name=name,
                checkpoint_every=2, device="cpu").items()}
    cfg.update(kw)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"distill": cfg}))
    return p


def _hdpipe(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def test_resume_after_sigkill_continues_the_loss_curve(world, tmp_path):
    full = _params_file(world, tmp_path, "full")
    r = subprocess.run(_hdpipe("distill", "--config", str(full)), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    reference = _steps(tmp_path / "runs" / "full")
    assert len(reference) == 18

    killed = _params_file(world, tmp_path, "killed")
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(_hdpipe("distill", "--config", str(killed)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill mid-epoch 1, after the step-8 checkpoint and before step 12
        log = run_dir / "log.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        steps = [json.loads(line).get("step", 0) for line in lines if line.strip()]
        if steps and max(steps) >= 9:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = _steps(run_dir)
    assert 9 <= partial[-1]["step"] < 18
    assert not (run_dir / "student").exists()

    r = subprocess.run(_hdpipe("distill", "--config", str(killed), "--resume"), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    resumed = _steps(run_dir)
    assert [x["step"] for x in resumed] == list(range(1, 19))
    for a, b in zip(reference, resumed):
        assert a["epoch"] == b["epoch"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        for k in ("loss", "loss_features", "loss_relations"):
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), (a["step"], k)  # CPU: identical curve
    env = json.loads((run_dir / "env.json").read_text())
    # killed after step 9: the last checkpoint is step 8 (mid-epoch 1, steps 7..12) or a later even step
    assert env["resumed_from_step"] % 2 == 0 and 8 <= env["resumed_from_step"] < 18
    # What DVC records after a resume equals the uninterrupted run's: epoch averages over all of the
    # epoch's steps (not only those run after the resume), metrics.json and the plot table.
    full_dir = tmp_path / "runs" / "full"
    ends = [[{k: v for k, v in r.items()} for r in _log(d) if r.get("event") == "epoch_end"]
            for d in (full_dir, run_dir)]
    assert [r["steps"] for r in ends[1]] == [6, 6, 6] and ends[0] == ends[1]
    assert (run_dir / "metrics.json").read_text() == (full_dir / "metrics.json").read_text()
    assert (run_dir / "plots" / "loss.csv").read_bytes() == (full_dir / "plots" / "loss.csv").read_bytes()


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world_size: int, port: int, cfg: DistillConfig):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distill(cfg)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_equal_one_process_on_the_same_global_batches(world, tmp_path, monkeypatch):
    """2 gloo ranks × batch 4 vs 1 process × batch 8 fed the concatenation of both ranks' batches:
    same losses per step (float tolerance 1e-5: gradient all-reduce sums in another order)."""
    import torch.multiprocessing as mp

    ddp_cfg = _cfg(world, tmp_path, name="ddp", epochs=2, checkpoint_every=0)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), ddp_cfg), nprocs=2, join=True, start_method="spawn")
    ddp_rows = _steps(tmp_path / "runs" / "ddp")

    feed_one_process_both_ranks(monkeypatch, rank_batch=4)
    one_rows = _steps(distill(_cfg(world, tmp_path, name="one", epochs=2, checkpoint_every=0, batch_size=8)))
    # 3 shards over 2 ranks: every rank gets >= 1 whole shard = 8 samples -> 2 steps of 4 per epoch
    assert len(ddp_rows) == len(one_rows) == 4
    for a, b in zip(ddp_rows, one_rows):
        assert a["lr"] == pytest.approx(b["lr"])
        for k in ("loss", "loss_features", "loss_relations"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)


def test_store_pixels_train_the_same_student_as_the_jpeg_path(world, tmp_path, monkeypatch):
    """The MIM store holds the student's pixels (tokens all: every patch): a run that reads them
    decodes no image at all, and trains the same student, step for step, as one that renders each
    view from the tar (losses equal to 1e-6, the exported weights equal)."""
    from safetensors.torch import load_file

    from pipeline.targets.store import TargetStore
    from pipeline.train import loader as L

    assert TargetStore.open(world["mim"]).attrs["student_pixels"]["img_size"] == 64
    runs = {}
    for mode in ("render", "store"):
        decoded = []
        real = L._decode_image
        monkeypatch.setattr(L, "_decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
        runs[mode] = distill(_cfg(world, tmp_path, name=mode, student_pixels=mode, workers=0))
        assert (len(decoded) > 0) == (mode == "render")
    a, b = _steps(runs["render"]), _steps(runs["store"])
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for k in ("loss", "loss_features", "loss_relations"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-6), (x["step"], k)
    wa, wb = (load_file(str(runs[m] / "student" / "model.safetensors")) for m in ("render", "store"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_student_pixels_store_without_them_is_a_clear_error(world, tmp_path):
    with pytest.raises(ConfigError, match="student_pixels 'store'.*rendered for.*student-img-size"):
        distill(_cfg(world, tmp_path, student_pixels="store", name="other-size",
                     model_kwargs={**STUDENT_KW, "img_size": 32, "patch_size": 4}))


# ----------------------------------------------------------------------------- equivalence
def test_cached_loss_equals_online_loss_on_the_same_views(world, tmp_path):
    """Loss from the loader's stored targets == loss with both teachers run here on the same views.
    The stores are fp16: tolerance rel 2e-3 on each term (fp16 has an 11-bit mantissa)."""
    from pipeline.train.loader import build_loader
    from pipeline.train.losses import hybrid_loss
    from pipeline.targets.masking import mask_layers, progressive_keep
    from pipeline.targets.store import TargetStore
    from pipeline.targets.teachers import load_teacher
    from pipeline.data.views import View, render
    from stages.distill import loader_config, build_student, target_sources

    cfg = _cfg(world, tmp_path)
    torch.manual_seed(0)
    student = build_student(cfg, target_sources(cfg).shapes()).eval()
    batch = next(iter(build_loader(loader_config(cfg, student, torch.device("cpu")), 0)))
    with torch.no_grad():
        out = student(batch["image"], batch["keep_index"])
    cached = hybrid_loss(out, batch, blocks=student.capture_blocks, head_rule=student.head_rule)

    from pipeline.data.reading import iter_shard
    from pipeline.data.manifest import read_manifest

    manifest = read_manifest(cfg.manifest)
    images = {r["index"]: r["image"] for k in range(len(manifest.shards)) for r in iter_shard(manifest, k)}
    views = TargetStore.open(cfg.mim_store).read_rows(batch["index"].tolist(), names=["views"])["views"]
    mim = load_teacher("timm:vit_tiny_patch16_224", random_init=True, model_kwargs=TEACHER_KW, device="cpu")
    disc = load_teacher("timm:deit_tiny_patch16_224", random_init=True, model_kwargs=DISC_KW, device="cpu")
    x01 = torch.stack([render(images[int(i)], View.from_row(views[j, int(v)]), 64, "bicubic")
                       for j, (i, v) in enumerate(zip(batch["index"], batch["view"]))])
    tm = mim.forward_targets(mim.normalize(x01), relation_layers=(4, 5), hidden_layers=mask_layers(6))
    keep = progressive_keep(tm["hidden"], mask_layers(6), 0.3)
    assert torch.equal(keep, batch["keep_index"])  # the stored mask is the online one
    tok = torch.cat([torch.zeros(len(keep), 1, dtype=torch.long), keep + 1], 1)
    rel = torch.stack([tm["relations"][layer] for layer in (4, 5)], 1)
    rel = torch.stack([rel[b][:, :, tok[b]][:, :, :, tok[b]] for b in range(len(tok))])
    feats = disc.forward_targets(disc.normalize(x01))["features"]
    feats = torch.stack([feats[b, tok[b]] for b in range(len(tok))])
    online = hybrid_loss(out, {"relations": rel.clone(), "features": feats.clone()},
                         blocks=student.capture_blocks, head_rule=student.head_rule)
    for k in ("loss", "loss_features", "loss_relations"):
        assert cached[k].item() == pytest.approx(online[k].item(), rel=2e-3), k


# ----------------------------------------------------------------------------- bad input
def test_missing_store_names_the_command(world, tmp_path):
    with pytest.raises(StoreError, match="no target store at .*hdpipe extract"):
        distill(_cfg(world, tmp_path, mim_store=str(tmp_path / "nope.zarr")))


def test_incomplete_store_names_missing_shards_and_command(world, tmp_path):
    broken = tmp_path / "mim.zarr"
    shutil.copytree(world["mim"], broken)
    (broken / "done" / "000001.json").unlink()
    with pytest.raises(StoreError) as e:
        distill(_cfg(world, tmp_path, mim_store=str(broken)))
    # The exact shard and the exact command that finishes this store (resuming it: same settings)
    command = (f"hdpipe extract --teacher timm:vit_tiny_patch16_224 --role mim --manifest {world['manifest']} "
               f"--out {broken} --random-init --model-kwargs '{{\"depth\": 6, \"img_size\": 64, \"patch_size\": 8}}' "
               "--views 1 --seed 0 --scale 0.2,1.0 --ratio 0.75,1.3333333333333333 --hflip --relation-layers 4,5 "
               "--extra-targets attention --mask-ratio 0.3 --tokens all --student-pixels --student-img-size 64 "
               "--student-interpolation bicubic --precision fp16")
    assert str(e.value) == (f"target store {broken} is incomplete: 1 of 3 shards not finished (1); "
                            f"run `{command}` to finish them")


def test_mismatched_stores_refused(world, tmp_path):
    other = _extract(world["manifest"], tmp_path / "targets", "mim", "mim", seed=7)  # another view plan
    with pytest.raises(StoreError, match="view_plan_digest"):
        distill(_cfg(world, tmp_path, mim_store=other))


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(relation_layers=(2,)), StoreError, r"relation layers \[2\] are not in .*--relation-layers 2,4,5"),
        (dict(mim_target="block_features"), StoreError, "block_features.*--extra-targets"),
        (dict(model_kwargs=dict(STUDENT_KW, depth=1)), ConfigError, "too shallow"),
        (dict(model_kwargs=dict(STUDENT_KW, num_heads=4)), ConfigError, "4 attention heads and the MIM teacher 3"),
        (dict(model_kwargs=dict(STUDENT_KW, img_size=32)), ConfigError, "patch grid"),
        (dict(model_kwargs=dict(STUDENT_KW, reg_tokens=4)), ConfigError, "register tokens"),
    ],
    ids=["layer-not-stored", "target-not-stored", "too-shallow", "heads", "grid", "registers"],
)
def test_student_the_store_cannot_serve(world, tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        distill(_cfg(world, tmp_path, **kw))
    assert not (tmp_path / "runs" / "t" / "checkpoints" / "last.pt").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path, monkeypatch):
    import pipeline.train.losses as mod
    from pipeline.train.checkpoint import load_checkpoint

    calls = {"n": 0}
    real = mod.hybrid_loss

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th step
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(mod, "hybrid_loss", poisoned)
    cfg = _cfg(world, tmp_path)
    with pytest.raises(NonFiniteError, match=r"the loss at step 5 .* non-finite value.*last good state \(step 4\)"):
        distill(cfg)
    ck = load_checkpoint(str(cfg.run_dir / "checkpoints" / "last.pt"))
    assert ck["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert [r["step"] for r in _steps(cfg.run_dir)] == [1, 2, 3, 4]
    # that checkpoint is mid-epoch: the loader's batch order depends on the worker count
    with pytest.raises(ConfigError, match=r"mid-epoch \(epoch 0, 4 batches done\).*workers 0 -> 1"):
        distill(replace(cfg, resume=True, workers=1))


def test_unwritable_run_dir(world, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(HdpipeError, match="not writable"):
        distill(_cfg(world, tmp_path, runs_dir=str(blocker)))


def test_existing_run_needs_resume(world, tmp_path):
    cfg = _cfg(world, tmp_path, epochs=1)
    distill(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        distill(cfg)
    with pytest.raises(ConfigError, match="alpha: checkpoint 1.0 vs now 0.5"):
        distill(replace(cfg, resume=True, alpha=0.5))


def test_export_is_byte_deterministic(tmp_path):
    """The same weights export to the same bytes (DVC hashes the export: a differing header would
    re-run evaluation and analysis after an identical training run)."""
    from pipeline.train.checkpoint import export_student

    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.zeros(4)}
    blobs = {(export_student(state, "vit_tiny_patch16_224", {"depth": 2}, tmp_path / str(i)) / "model.safetensors")
             .read_bytes() for i in range(10)}
    assert len(blobs) == 1


# ----------------------------------------------------------------------------- online reference mode
@pytest.mark.parametrize("token_resample", [1.0, 0.75])
def test_cached_cycle_equals_online_run(world, tmp_path, token_resample):
    """One extraction with V = 3 views, `cycle` (epoch e shows stored view e) vs the online mode
    (both teachers in every step, epoch e drawing view e of the same plan): the same per-step losses
    and final weights up to the fp16 stores' rounding (targets within 2**-11 relative; measured:
    losses within 1.2e-5 relative, weights within 1.1e-4 absolute; asserted with a margin). With
    token resampling both see the same seeded subset of each view's tokens every epoch."""
    from pipeline.targets.store import TargetStore
    from stages.extract import ExtractConfig, extract

    params = tmp_path / "params.yaml"
    sections = {
        "extract_mim": dict(manifest=world["manifest"], teacher="timm:vit_tiny_patch16_224", role="mim",
                            random_init=True, model_kwargs=TEACHER_KW, views=3, seed=4, name="mim3",
                            targets=str(tmp_path / "t"), progress=False),
        "extract_disc": dict(manifest=world["manifest"], teacher="timm:deit_tiny_patch16_224", role="disc",
                             random_init=True, model_kwargs=DISC_KW, mim_store=str(tmp_path / "t" / "mim3.zarr"),
                             name="disc3", targets=str(tmp_path / "t"), progress=False),
    }
    params.write_text(yaml.safe_dump(sections))
    mim = extract(ExtractConfig(**sections["extract_mim"], device="cpu"))
    disc = extract(ExtractConfig(**sections["extract_disc"], device="cpu"))
    assert TargetStore.open(mim).views == 3
    common = dict(epochs=3, checkpoint_every=0, mim_store=mim, disc_store=disc, token_resample=token_resample)
    cached = distill(_cfg(world, tmp_path, name="cached", view_schedule="cycle", **common))
    online = distill(_cfg(world, tmp_path, name="online", source="online", online_mim=f"{params}:extract_mim",
                          online_disc=f"{params}:extract_disc", **common))
    a, b = _steps(cached), _steps(online)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 19))
    for x, y in zip(a, b):
        for k in ("loss", "loss_features", "loss_relations"):
            assert y[k] == pytest.approx(x[k], rel=1e-4), (x["step"], k)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "student" / "model.safetensors")) for d in (cached, online))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=5e-4)


def test_online_mode_builds_teachers_only_when_asked(world, tmp_path, monkeypatch):
    """`--source cache` never builds a teacher (the point of hdpipe); `online` does, twice."""
    import pipeline.targets.teachers as teachers

    built = []
    real = teachers.load_teacher
    monkeypatch.setattr(teachers, "load_teacher", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    distill(_cfg(world, tmp_path, name="c", epochs=1, checkpoint_every=0))
    assert built == []


def test_token_resampling_in_the_loader_equals_cutting_the_full_batch(world, tmp_path):
    """Cached resampling (per sample, in the loader) == `resample_batch` on the same batch read with
    every token (an independent path: torch gathers over the batch), for relations-like attention
    rows (renormalized) and features; a mid-epoch resume (`skip_batches`) shows the same subsets."""
    from pipeline.train.loader import build_loader
    from pipeline.train.resample import resample_batch
    from stages.distill import build_student, loader_config, target_sources

    cfg = _cfg(world, tmp_path, mim_target="attention")
    student = build_student(cfg, target_sources(cfg).shapes())
    full_cfg = loader_config(cfg, student, torch.device("cpu"))
    cut_cfg = replace(full_cfg, token_resample=0.75)
    for epoch in (0, 1):
        full = list(build_loader(full_cfg, epoch))
        cut = list(build_loader(cut_cfg, epoch))
        assert len(full) == len(cut) == 6
        for a, b in zip(full, cut):
            want = resample_batch(a, 0.75, cfg.seed, epoch)
            assert b["keep_index"].shape[1] == round(0.75 * a["keep_index"].shape[1] + 1e-9)
            assert torch.equal(b["keep_index"], want["keep_index"]) and torch.equal(b["index"], a["index"])
            for key in ("attention", "features"):
                torch.testing.assert_close(b[key], want[key], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(b["attention"].sum(-1), torch.ones_like(b["attention"][..., 0]))
        if epoch == 1:
            resumed = list(build_loader(cut_cfg, epoch, skip_batches=4))
            assert [torch.equal(x["keep_index"], y["keep_index"]) for x, y in zip(resumed, cut[4:])] == [True, True]
    # another epoch shows other subsets of the same views' tokens
    e0, e1 = next(iter(build_loader(cut_cfg, 0))), next(iter(build_loader(cut_cfg, 1)))
    assert not torch.equal(e0["keep_index"], e1["keep_index"])
