"""The extract stage on real tars, a real tiny timm teacher (random init) and real Zarr stores.

Each store value is checked against an independent computation (Q·Kᵀ from the model's own qkv
weights, features from timm's own forward_features) on views rebuilt from the plan; resume after
SIGKILL and bad inputs run the real `hdpipe extract` / `extract()`.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import ConfigError, NonFiniteError, ShardError, StoreError
from toydata import BROKEN_JPEG, structured_jpeg, write_dataset
from pipeline.targets.store import TargetStore
from stages.extract import ExtractConfig, extract

TINY = "timm:vit_tiny_patch16_224"
TINY_KW = {"img_size": 64, "patch_size": 8, "depth": 6}  # 8x8 = 64 patches, 3 heads, 192-d, L = 6
DISC = "timm:deit_tiny_patch16_224"
DISC_KW = {"img_size": 64, "patch_size": 8, "depth": 2}
SHARD = 8  # samples per tar shard


def make_dataset(folder: Path, n: int = 24, seed: int = 0, corrupt: tuple[int, ...] = ()) -> str:
    """Tars of SHARD JPEGs and their manifest; indices in `corrupt` hold bytes that do not decode."""
    rng = np.random.default_rng(seed)
    payloads = [structured_jpeg(rng) for _ in range(n)]
    return write_dataset(folder, [BROKEN_JPEG if i in corrupt else p for i, p in enumerate(payloads)], SHARD)


def mim_cfg(manifest: str, targets: Path, **kw) -> ExtractConfig:
    base = dict(manifest=manifest, teacher=TINY, role="mim", random_init=True, model_kwargs=TINY_KW, views=1,
                targets=str(targets), name="mim", batch_size=16, device="cpu", progress=False)
    base.update(kw)
    return ExtractConfig(**base)


def disc_cfg(manifest: str, targets: Path, **kw) -> ExtractConfig:
    base = dict(manifest=manifest, teacher=DISC, random_init=True, model_kwargs=DISC_KW, targets=str(targets),
                name="disc", mim_store=str(targets / "mim.zarr"), batch_size=16, device="cpu", progress=False)
    base.update(kw)
    return ExtractConfig(**base)


# ---------------------------------------------------------------------------------------------
# Independent reference: timm model from the saved checkpoint, views cropped with PIL directly


def save_checkpoint(path: Path, arch: str, kwargs: dict, seed: int) -> Path:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    torch.save(model.state_dict(), path)
    return path


def load_model(path: Path, arch: str, kwargs: dict):
    import timm

    model = timm.create_model(arch, pretrained=False, **kwargs)
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model.eval()


def crop(data: bytes, box, flip: bool, model, size: int = 64, resample=Image.BICUBIC, mean=None,
         std=None) -> torch.Tensor:
    """[3, size, size] normalized with the model's own pretrained_cfg mean/std (or the given ones):
    pixel box from the normalized box, PIL bicubic (or `resample`), then the flip."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    x0, y0, x1, y1 = (int(round(v)) for v in (box[0] * w, box[1] * h, box[2] * w, box[3] * h))
    im = im.crop((x0, y0, x1, y1)).resize((size, size), resample)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = model.pretrained_cfg["mean"] if mean is None else mean
    std = model.pretrained_cfg["std"] if std is None else std
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def tar_images(manifest_path: str) -> dict[int, bytes]:
    folder = Path(manifest_path).parent
    out = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    out[int(m.name.split(".")[0])] = tar.extractfile(m).read()
    return out


@torch.no_grad()
def reference(model, x: torch.Tensor) -> dict:
    """Q·Kᵀ per block from the qkv weights, tokens entering each block, final-norm features."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    hidden, rel = {0: t}, {}
    for i, blk in enumerate(model.blocks, start=1):
        y = blk.norm1(t)
        qkv = y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias  # [B, N, 3D]
        b, n, _ = qkv.shape
        q, k, _ = qkv.reshape(b, n, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        rel[i] = q @ k.transpose(-1, -2)  # [B, H, N, N], raw (no 1/sqrt(d))
        t = blk(t)
        hidden[i] = t
    return {"relations": rel, "hidden": hidden, "features": model.norm(t), "head_dim": q.shape[-1]}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def read_all(url: str) -> dict[str, np.ndarray]:
    store = TargetStore.open(url)
    parts = [store.read_shard(k) for k in range(store.num_shards)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def assert_same_store(a: str, b: str) -> None:
    ra, rb = read_all(a), read_all(b)
    assert sorted(ra) == sorted(rb)
    for name in ra:
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# Fixtures: one dataset, one MIM store and one disc store for the module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    manifest = make_dataset(root / "data", n=24)
    mim_ckpt = save_checkpoint(root / "mim.pth", "vit_tiny_patch16_224", TINY_KW, seed=1)
    disc_ckpt = save_checkpoint(root / "disc.pth", "deit_tiny_patch16_224", DISC_KW, seed=2)
    targets = root / "targets"
    mim = extract(mim_cfg(manifest, targets, random_init=False, checkpoint=str(mim_ckpt)))
    disc = extract(disc_cfg(manifest, targets, random_init=False, checkpoint=str(disc_ckpt)))
    return {"root": root, "manifest": manifest, "targets": targets, "mim": mim, "disc": disc,
            "mim_ckpt": mim_ckpt, "disc_ckpt": disc_ckpt, "images": tar_images(manifest)}


def test_mim_store_matches_independent_qk_and_masks(world):
    from pipeline.targets.masking import direct_keep, progressive_keep
    from pipeline.data.views import ViewPlan

    store = TargetStore.open(world["mim"])
    a = store.attrs
    assert a["relation_layers"] == [4, 5]  # default (L-2, L-1) for L = 6
    assert a["mask"]["layers"] == [0, 2, 4] and a["mask"]["n_keep"] == 22  # 64 -> 45 -> 31 -> 22 at K = 0.3
    got = read_all(world["mim"])
    assert got["relations"].shape == (24, 1, 2, 3, 23, 23) and got["valid"].all()
    plan = ViewPlan(seed=0, views=1, size=64)
    model = load_model(world["mim_ckpt"], "vit_tiny_patch16_224", TINY_KW)
    idx = list(range(24))
    boxes = []
    for i in idx:
        im = Image.open(io.BytesIO(world["images"][i]))
        boxes.append(plan.view(i, 0, *im.size).as_row())
    np.testing.assert_array_equal(got["views"][:, 0], np.stack(boxes))  # a pure function of (seed, index, view)
    x = torch.stack([crop(world["images"][i], b[:4], b[4] > 0.5, model) for i, b in zip(idx, boxes)])
    ref = reference(model, x)
    prog = progressive_keep({i: ref["hidden"][i] for i in (0, 2, 4)}, (0, 2, 4), 0.3)
    np.testing.assert_array_equal(got["keep_progressive"][:, 0], prog.numpy())
    np.testing.assert_array_equal(got["keep_direct"][:, 0], direct_keep(ref["hidden"][6], 22).numpy())
    keep = got["keep_progressive"][:, 0].astype(np.int64)
    assert (np.diff(keep, axis=1) > 0).all() and keep.min() >= 0 and keep.max() < 64
    tok = torch.cat([torch.zeros(24, 1, dtype=torch.long), torch.from_numpy(keep) + 1], 1)  # [CLS] + kept
    for j, layer in enumerate((4, 5)):
        r = ref["relations"][layer]
        want = torch.stack([r[b][:, tok[b]][:, :, tok[b]] for b in range(24)])  # [B, H, T, T]
        assert rel_err(got["relations"][:, 0, j], want) < 2e-3  # fp16 storage (2**-11 per element)
        assert not np.allclose(got["relations"][:, 0, j], want.numpy() * want.shape[-1] ** -0.5)


def test_disc_features_equal_final_norm_tokens(world):
    disc = read_all(world["disc"])
    mim = read_all(world["mim"])
    a = TargetStore.open(world["disc"]).attrs
    assert a["tokens"] == "kept" and a["view_plan_digest"] == TargetStore.open(world["mim"]).attrs["view_plan_digest"]
    model = load_model(world["disc_ckpt"], "deit_tiny_patch16_224", DISC_KW)
    x = torch.stack([crop(world["images"][i], mim["views"][i, 0, :4], mim["views"][i, 0, 4] > 0.5, model)
                     for i in range(24)])
    with torch.no_grad():
        feats = model.forward_features(x)  # [B, 65, 192], after the final norm
    keep = mim["keep_progressive"][:, 0].astype(np.int64)
    want = np.stack([feats[b, np.concatenate([[0], keep[b] + 1])].numpy() for b in range(24)])
    assert disc["features"].shape == (24, 1, 23, 192)
    assert rel_err(disc["features"][:, 0], want) < 2e-3


def test_preprocessing_overrides_are_recorded_and_applied(world, tmp_path):
    """--mean/--std/--interpolation override the teacher's own config: the store records them (and
    refuses a rerun without them), hints repeat them, and the stored features are those of views
    resized with that filter and normalized with that mean/std (an independent PIL + torch path)."""
    from pipeline.targets.hints import extract_command

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    cfg = disc_cfg(world["manifest"], tmp_path, random_init=False, checkpoint=str(world["disc_ckpt"]),
                   mim_store=world["mim"], mean=mean, std=std, interpolation="bilinear", name="gray")
    store = TargetStore.open(extract(cfg))
    assert store.attrs["preprocessing"]["mean"] == list(mean) and store.attrs["preprocessing"]["std"] == list(std)
    assert store.attrs["preprocessing"]["interpolation"] == "bilinear"
    assert store.attrs["preprocessing_override"] == {"mean": list(mean), "std": list(std), "interpolation": "bilinear"}
    hint = extract_command(store.attrs, manifest=world["manifest"], out=store.url)
    assert "--mean 0.5,0.5,0.5 --std 0.25,0.25,0.25 --interpolation bilinear" in hint
    with pytest.raises(StoreError, match="preprocessing"):
        extract(replace(cfg, mean=None, std=None, interpolation=None))  # same store, other settings
    mim = read_all(world["mim"])
    model = load_model(world["disc_ckpt"], "deit_tiny_patch16_224", DISC_KW)
    x = torch.stack([crop(world["images"][i], mim["views"][i, 0, :4], mim["views"][i, 0, 4] > 0.5, model,
                          resample=Image.BILINEAR, mean=mean, std=std) for i in range(24)])
    with torch.no_grad():
        feats = model.forward_features(x)
    keep = mim["keep_progressive"][:, 0].astype(np.int64)
    want = np.stack([feats[b, np.concatenate([[0], keep[b] + 1])].numpy() for b in range(24)])
    assert rel_err(read_all(store.url)["features"][:, 0], want) < 2e-3


def test_all_tokens_extras_int8_match_module(world, tmp_path):
    """tokens=all + attention + block_features at int8: relations are the full Q·Kᵀ, softmax of
    them times V through the module's proj equals the attention module's own output, block
    features equal the block outputs."""
    cfg = mim_cfg(world["manifest"], tmp_path, random_init=False, checkpoint=str(world["mim_ckpt"]),
                  tokens="all", extra_targets=("attention", "block_features"), precision="int8",
                  relation_layers=(2, 0))
    got = read_all(extract(cfg))
    assert TargetStore.open(str(tmp_path / "mim.zarr")).attrs["relation_layers"] == [2, 6]
    model = load_model(world["mim_ckpt"], "vit_tiny_patch16_224", TINY_KW)
    x = torch.stack([crop(world["images"][i], got["views"][i, 0, :4], got["views"][i, 0, 4] > 0.5, model)
                     for i in range(24)])
    ref = reference(model, x)
    assert got["relations"].shape == (24, 1, 2, 3, 65, 65)
    for j, layer in enumerate((2, 6)):
        assert rel_err(got["relations"][:, 0, j], ref["relations"][layer]) < 1e-2  # int8: ~0.5% per row
        blk = model.blocks[layer - 1]
        with torch.no_grad():
            y = blk.norm1(ref["hidden"][layer - 1])
            own = blk.attn(y)  # the module's attention output [B, N, D]
            v = (y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(24, 65, 3, 3, 64)[:, :, 2].transpose(1, 2)
            mixed = torch.from_numpy(got["attention"][:, 0, j]).float() @ v  # [B, H, N, hd]
            out = blk.attn.proj(mixed.transpose(1, 2).reshape(24, 65, 192))
        assert rel_err(out, own) < 2e-2
        assert rel_err(got["block_features"][:, 0, j], ref["hidden"][layer]) < 1e-2
    from pipeline.targets.quant import CODECS
    from stages.verify import VerifyConfig, verify

    report = verify(VerifyConfig(store=str(tmp_path / "mim.zarr"), samples=5, device="cpu"))
    assert report["ok"] and report["tolerance"] == CODECS["int8"].verify_tolerance, report
    assert sorted(report["arrays"]) == ["attention", "block_features", "keep_direct", "keep_progressive",
                                        "relations", "student_pixels", "views"]
    assert report["arrays"]["student_pixels"]["max_abs"] == 0


def test_resume_skips_done_shards_and_refuses_other_settings(world):
    store = TargetStore.open(world["mim"])
    before = {k: store.done_marker(k)["written"] + str(store.done_marker(k)["pid"]) for k in range(3)}
    cfg = mim_cfg(world["manifest"], world["targets"], random_init=False, checkpoint=str(world["mim_ckpt"]))
    assert extract(cfg) == world["mim"]
    assert {k: store.done_marker(k)["written"] + str(store.done_marker(k)["pid"]) for k in range(3)} == before
    with pytest.raises(StoreError, match=r"mask\.ratio.*--overwrite"):
        extract(replace(cfg, mask_ratio=0.5))


def test_overwrite_rebuilds(world, tmp_path):
    cfg = mim_cfg(world["manifest"], tmp_path, random_init=False, checkpoint=str(world["mim_ckpt"]))
    extract(replace(cfg, mask_ratio=0.5))
    assert TargetStore.open(str(tmp_path / "mim.zarr")).attrs["mask"]["n_keep"] == 64 - 32 - 16 - 8
    extract(replace(cfg, overwrite=True))
    assert_same_store(str(tmp_path / "mim.zarr"), world["mim"])


def test_disc_refuses_missing_incomplete_or_mismatched_mim_store(world, tmp_path):
    """A discriminative run inherits the MIM store's view plan; a restated setting that differs is
    an error that never proposes to rebuild the MIM store, and no hint overwrites a store."""
    base = disc_cfg(world["manifest"], tmp_path, random_init=False, checkpoint=str(world["disc_ckpt"]),
                    mim_store=world["mim"])
    with pytest.raises(StoreError, match="cannot be opened.*make it first with hdpipe extract --role mim"):
        extract(replace(base, mim_store=str(tmp_path / "nowhere.zarr")))
    with pytest.raises(ConfigError, match=r"--seed 5 \(the store has 0\): .*drop these options") as err:
        extract(replace(base, seed=5))
    with pytest.raises(ConfigError, match=r"--views 2 \(the store has 1\)"):
        extract(replace(base, views=2))
    assert "overwrite" not in str(err.value) and "hdpipe extract" not in str(err.value)
    extract(replace(base, views=1, seed=0, hflip=True, name="same-plan"))  # restating the same plan is fine
    other = make_dataset(tmp_path / "other", n=24, seed=7)
    with pytest.raises(StoreError, match=f"another manifest.*`hdpipe extract --teacher {TINY} --role mim "
                                         f"--manifest {other} --out .*mim-toy.zarr") as err:
        extract(replace(base, manifest=other))
    assert "--overwrite" not in str(err.value)
    # An incomplete MIM store: a copy with one done marker removed.
    import shutil

    partial = tmp_path / "partial.zarr"
    shutil.copytree(world["mim"], partial)
    (partial / "done" / "000001.json").unlink()
    with pytest.raises(StoreError, match=f"incomplete: 1 of 3 shards not finished \\(1\\); run `hdpipe extract "
                                         f"--teacher {TINY} --role mim --manifest .* --out {partial} ") as err:
        extract(replace(base, mim_store=str(partial)))
    assert "--overwrite" not in str(err.value)
    assert not (tmp_path / "disc.zarr").exists()  # refused before anything was created


def test_unknown_teacher_lists_choices(world, tmp_path):
    with pytest.raises(ConfigError, match="unknown teacher 'maee'.*mae, clip, deit, dino, timm:NAME"):
        extract(mim_cfg(world["manifest"], tmp_path, teacher="maee"))


def test_unwritable_output_path(world, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match=f"cannot write the store {blocker}/sub/mim.zarr: {blocker} is not a folder"):
        extract(mim_cfg(world["manifest"], blocker / "sub"))


def test_corrupt_image_fail_then_skip(tmp_path, world):
    manifest = make_dataset(tmp_path / "data", n=16, seed=3, corrupt=(11,))
    cfg = mim_cfg(manifest, tmp_path / "t", random_init=False, checkpoint=str(world["mim_ckpt"]))
    with pytest.raises(ShardError, match=r"image 000000011 \(img11.jpg\) in shard 1 .*--on-error skip"):
        extract(cfg)
    store = TargetStore.open(str(tmp_path / "t" / "mim.zarr"))
    assert store.done_shards() == {0}  # the finished shard is kept
    extract(replace(cfg, on_error="skip"))
    got = read_all(str(tmp_path / "t" / "mim.zarr"))
    assert got["valid"].tolist() == [i != 11 for i in range(16)]
    assert not got["relations"][11].any() and got["relations"][10].any()
    skipped = store.done_marker(1)["skipped"]
    assert [s["index"] for s in skipped] == [11] and "does not decode (OSError" in skipped[0]["reason"]
    assert store.done_marker(0)["skipped"] == []


@pytest.mark.parametrize("limit", [400_000_000, None])
def test_corrupt_image_past_the_bomb_check_with_the_manifests_pixel_limit(tmp_path, limit):
    """Extraction decodes with the limit the manifest records (`hdpipe shard --max-image-pixels`): a
    200 Mpx header (with cut pixel data) gets past the bomb check under 400 Mpx and is skipped only as
    truncated; under the default it is skipped citing hdpipe's limit and option, not Pillow's."""
    from pipeline.data.manifest import read_manifest, write_manifest
    from toydata import bomb_png

    rng = np.random.default_rng(4)
    payloads = [bomb_png(20_000, 10_000) if i == 3 else structured_jpeg(rng) for i in range(SHARD)]
    manifest = write_dataset(tmp_path / "data", payloads, SHARD)
    if limit is not None:
        m = read_manifest(manifest)
        manifest = str(write_manifest(replace(m, max_image_pixels=limit), tmp_path / "data" / "raised.json").path)
    store = TargetStore.open(extract(mim_cfg(manifest, tmp_path / "t", on_error="skip")))
    [skipped] = store.done_marker(0)["skipped"]
    assert skipped["index"] == 3, skipped
    if limit is None:
        assert "20000x10000 = 200000000 pixels exceeds max_image_pixels=178956970" in skipped["reason"], skipped
        assert "--max-image-pixels" in skipped["reason"]
    else:
        assert "does not decode (OSError: image file is truncated" in skipped["reason"], skipped
        assert "178956970" not in skipped["reason"] and "DecompressionBomb" not in skipped["reason"]


@pytest.mark.parametrize("how", ["manifest records another sha256", "tar changed in place, same size"])
def test_tar_not_matching_its_sha256_never_reaches_the_store(tmp_path, how):
    """A wrong hash, or one byte changed in a tar, stops extraction at that shard with the tar and
    both hashes named; shards done before stay done, and the bad shard gets no done marker."""
    import hashlib

    from pipeline.errors import IntegrityError
    from pipeline.data.manifest import read_manifest, write_manifest

    manifest = make_dataset(tmp_path / "data", n=24, seed=5)
    m = read_manifest(manifest)
    tar = m.shard_url(1)
    want = m.shards[1].sha256
    if how.startswith("manifest"):
        shards = list(m.shards)
        shards[1] = replace(shards[1], sha256="0" * 64)
        write_manifest(replace(m, shards=tuple(shards)), manifest)
        want, got = "0" * 64, m.shards[1].sha256
    else:
        blob = bytearray(open(tar, "rb").read())
        blob[900] ^= 0x55
        open(tar, "wb").write(bytes(blob))
        got = hashlib.sha256(bytes(blob)).hexdigest()
    cfg = mim_cfg(manifest, tmp_path / "t")
    with pytest.raises(IntegrityError) as err:
        extract(cfg)
    assert tar in str(err.value) and got in str(err.value) and want in str(err.value)
    assert TargetStore.open(str(tmp_path / "t" / "mim.zarr")).done_shards() == {0}


def test_non_finite_teacher_output_is_refused(world, tmp_path):
    state = torch.load(world["mim_ckpt"])
    state["blocks.3.mlp.fc1.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.pth"
    torch.save(state, bad)
    with pytest.raises(NonFiniteError, match="non-finite"):
        extract(mim_cfg(world["manifest"], tmp_path / "t", random_init=False, checkpoint=str(bad)))
    assert TargetStore.open(str(tmp_path / "t" / "mim.zarr")).done_shards() == set()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def test_resume_after_sigkill_is_identical(world, tmp_path):
    """SIGKILL a real `hdpipe extract` once its first shard is done, re-run it, and compare every
    array with an uninterrupted run's store."""
    manifest = make_dataset(tmp_path / "data", n=48, seed=4)  # 6 shards
    args = ["extract", "--manifest", manifest, "--teacher", TINY, "--role", "mim", "--checkpoint",
            str(world["mim_ckpt"]), "--model-kwargs", json.dumps(TINY_KW), "--targets", str(tmp_path / "t"),
            "--name", "mim", "--views", "3", "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(_cli(*args), env=env, stdout=subprocess.DEVNULL, stderr=log)
    done_dir = tmp_path / "t" / "mim.zarr" / "done"
    deadline = time.time() + 120
    while not (done_dir.exists() and any(done_dir.glob("*.json"))):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = TargetStore.open(str(tmp_path / "t" / "mim.zarr")).done_shards()
    assert 1 <= len(done) < 6, done  # killed mid-run
    rerun = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{6 - len(done)} of 6 shards to do" in rerun.stderr
    clean = extract(mim_cfg(manifest, tmp_path / "clean", random_init=False, checkpoint=str(world["mim_ckpt"]),
                            views=3))
    assert_same_store(str(tmp_path / "t" / "mim.zarr"), clean)


def test_verify_passes_then_catches_tampering(world, tmp_path, capsys):
    import shutil

    from stages.verify import VerifyConfig, verify

    for url in (world["mim"], world["disc"]):
        report = verify(VerifyConfig(store=url, samples=6, device="cpu"))
        assert report["ok"], report
        assert report["samples"] == 6
        for name, entry in report["arrays"].items():
            if "rel" in entry:
                assert 0 <= entry["rel"] < 2e-3, (name, entry)  # fp16 storage error only
    copy = tmp_path / "mim.zarr"
    shutil.copytree(world["mim"], copy)
    (copy / "extract-config.json").write_text((Path(world["mim"]) / "extract-config.json").read_text())
    store = TargetStore.open(str(copy), mode="r+")
    arrays = store.read_shard(2)
    arrays["relations"][3] *= 1.05  # one sample's relations off by 5%
    store.write_shard(2, arrays, {})
    report = verify(VerifyConfig(store=str(copy), samples=24, device="cpu"))
    assert not report["ok"] and not report["arrays"]["relations"]["ok"]
    assert 0.04 < report["arrays"]["relations"]["rel"] < 0.06
    assert report["arrays"]["keep_progressive"]["ok"] and report["arrays"]["views"]["ok"]
    from pipeline.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the shell sees status 1
        main(["verify", str(copy), "--samples", "24", "--device", "cpu"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "relations" in out and "FAIL" in out and "verify: FAILED" in out
