"""The student's pixels in MIM stores (issue 19): `hdpipe extract` stores each view's student input
at its stored tokens' patches, exactly as stage two would render it from the tar.

Real tiny timm teachers (random init), real webdataset tars, real Zarr stores on disk; the stored
pixels are compared with an independent render (PIL crop + resize + flip of the tar's JPEG).
"""
from __future__ import annotations

import dataclasses
import io
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.data.patches import place_patches, take_patches
from pipeline.errors import ConfigError
from pipeline.targets.store import TargetStore
from stages.extract import ExtractConfig, extract
from toydata import structured_jpeg, write_dataset

MIM = "timm:vit_tiny_patch16_224"
DISC = "timm:deit_tiny_patch16_224"
KW = {"img_size": 32, "patch_size": 4, "depth": 3}  # 8x8 = 64 patches -> 45 -> 31 -> 22 kept


def _mim(manifest: str, out: Path, **kw) -> ExtractConfig:
    base = dict(manifest=manifest, teacher=MIM, role="mim", random_init=True, model_kwargs=KW, out=str(out), views=2,
                batch_size=5, device="cpu", progress=False)
    return ExtractConfig(**{**base, **kw})


def _tar_images(manifest: str) -> dict[int, bytes]:
    out = {}
    for path in sorted(Path(manifest).parent.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    out[int(m.name.split(".")[0])] = tar.extractfile(m).read()
    return out


def _render(data: bytes, row: np.ndarray, size: int, resample) -> np.ndarray:
    """Independent render: uint8 [3, size, size], pixel box from the stored normalized box, PIL
    resize, then the flip (what stage two's `render_uint8` is meant to compute)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    x0, y0, x1, y1 = (int(round(float(v))) for v in (row[0] * w, row[1] * h, row[2] * w, row[3] * h))
    im = im.crop((x0, y0, x1, y1)).resize((size, size), resample)
    if row[4] > 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im).transpose(2, 0, 1)


def _patches(image: np.ndarray, ids, p: int, gw: int) -> np.ndarray:
    """[K, 3, p, p]: patch id i is row i // gw, column i % gw (raster order), by plain slicing."""
    return np.stack([image[:, (i // gw) * p:(i // gw + 1) * p, (i % gw) * p:(i % gw + 1) * p] for i in ids])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixels")
    rng = np.random.default_rng(0)
    manifest = write_dataset(root / "data", [structured_jpeg(rng, (40, 90)) for _ in range(10)], 4)
    kept = extract(_mim(manifest, root / "kept.zarr"))
    return {"root": root, "manifest": manifest, "kept": kept, "images": _tar_images(manifest)}


def _read(url: str, names) -> dict[str, np.ndarray]:
    store = TargetStore.open(url)
    parts = [store.read_shard(k, names) for k in range(store.num_shards)]
    return {n: np.concatenate([p[n] for p in parts]) for n in names}


# ---- place / take: pure, table-driven --------------------------------------------------------


@pytest.mark.parametrize("grid,p,k", [((8, 8), 4, 22), ((14, 14), 16, 67), ((4, 4), 2, 16), ((3, 3), 5, 1)])
def test_take_then_place_is_the_image_at_the_given_patches_and_zero_elsewhere(grid, p, k):
    gen = torch.Generator().manual_seed(k)
    b, (gh, gw) = 3, grid
    image = torch.randint(0, 256, (b, 3, gh * p, gw * p), dtype=torch.uint8, generator=gen)
    keep = torch.stack([torch.randperm(gh * gw, generator=gen)[:k].sort().values for _ in range(b)])
    patches = take_patches(image, keep, grid)
    assert patches.shape == (b, k, 3, p, p) and patches.dtype == torch.uint8
    for i in range(b):
        np.testing.assert_array_equal(patches[i].numpy(), _patches(image[i].numpy(), keep[i].tolist(), p, gw))
    placed = place_patches(patches, keep, grid)
    mask = torch.zeros(b, gh * gw, dtype=torch.bool)
    mask[torch.arange(b)[:, None], keep] = True
    pixel_mask = mask.reshape(b, 1, gh, 1, gw, 1).expand(b, 3, gh, p, gw, p).reshape(image.shape)
    assert torch.equal(placed, torch.where(pixel_mask, image, torch.zeros_like(image)))
    assert torch.equal(take_patches(placed, keep, grid), patches)  # the inverse on the given patches


def test_patches_refuse_an_image_off_the_grid():
    with pytest.raises(ConfigError, match="8x8 grid"):
        take_patches(torch.zeros(1, 3, 30, 30, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.long), (8, 8))


def test_one_render_serves_both_when_size_and_filter_agree():
    """`render` is `render_uint8 / 255` bit for bit, so extraction renders a view once for both."""
    from pipeline.data.views import ViewPlan, render, render_uint8
    from pipeline.targets.pixels import StudentPixels, render_views

    rng = np.random.default_rng(1)
    plan = ViewPlan(seed=0, views=2, size=32)
    for i in range(6):
        im = Image.open(io.BytesIO(structured_jpeg(rng, (40, 90))))
        view = plan.view(i, i % 2, *im.size)
        x, u = render_views(im, view, 32, "bicubic", StudentPixels.for_grid(32, "bicubic", (8, 8)))
        assert torch.equal(x, render(im, view, 32, "bicubic")) and torch.equal(u, render_uint8(im, view, 32))
        x, u = render_views(im, view, 32, "bicubic", StudentPixels.for_grid(48, "bilinear", (8, 8)))
        assert torch.equal(x, render(im, view, 32, "bicubic"))
        assert torch.equal(u, render_uint8(im, view, 48, "bilinear"))


# ---- extraction --------------------------------------------------------------------------------


def _check_pixels(url: str, images: dict, size: int, resample, tokens: str) -> None:
    store = TargetStore.open(url)
    px = store.attrs["student_pixels"]
    gh, gw = store.attrs["grid"]
    p = size // gh
    assert px["img_size"] == size and px["patch_size"] == p
    got = _read(url, ["student_pixels", "views", "keep_progressive", "valid"])
    n, v = got["views"].shape[:2]
    K = got["keep_progressive"].shape[-1] if tokens == "kept" else gh * gw
    assert got["student_pixels"].shape == (n, v, K, 3, p, p) and got["student_pixels"].dtype == np.uint8
    for i in range(n):
        for j in range(v):
            want = _render(images[i], got["views"][i, j], size, resample)
            ids = got["keep_progressive"][i, j].tolist() if tokens == "kept" else range(gh * gw)
            np.testing.assert_array_equal(got["student_pixels"][i, j], _patches(want, ids, p, gw), err_msg=f"{i}/{j}")


def test_pixels_equal_an_independent_render_at_the_kept_patches(world):
    store = TargetStore.open(world["kept"])
    assert store.attrs["student_pixels"] == {"img_size": 32, "patch_size": 4, "interpolation": "bicubic",
                                             "renderer": "pipeline.data.views.render_uint8 v2"}
    spec = store.arrays["student_pixels"]
    assert (spec.shape_tail, spec.dtype, spec.precision, spec.pixels) == ((22, 3, 4, 4), "uint8", "exact", True)
    _check_pixels(world["kept"], world["images"], 32, Image.BICUBIC, "kept")


def test_tokens_all_store_every_patch_and_another_size_and_filter(world):
    url = extract(_mim(world["manifest"], world["root"] / "all.zarr", tokens="all", student_img_size=48,
                       student_interpolation="bilinear"))
    assert TargetStore.open(url).arrays["student_pixels"].shape_tail == (64, 3, 6, 6)
    _check_pixels(url, world["images"], 48, Image.BILINEAR, "all")


def test_no_student_pixels_changes_nothing_else(world, tmp_path):
    """Without pixels: no array, no attribute, the same teacher targets bit for bit (the shared
    render feeds the teacher exactly what it saw before), inspect says so, hints repeat it."""
    from pipeline.targets.hints import extract_command
    from stages.inspect_store import format_info, inspect_store

    url = extract(_mim(world["manifest"], tmp_path / "plain.zarr", student_pixels=False))
    store = TargetStore.open(url)
    assert "student_pixels" not in store.arrays and "student_pixels" not in store.attrs
    assert "pixel arrays" not in store.attrs["codec"]
    names = ["views", "keep_progressive", "keep_direct", "relations"]
    plain, kept = _read(url, names), _read(world["kept"], names)
    for name in names:
        np.testing.assert_array_equal(plain[name], kept[name], err_msg=name)
    info = inspect_store(url)
    assert info["student_pixels"] is None
    assert "student pixels none" in format_info(info)
    assert "--no-student-pixels" in extract_command(store.attrs, manifest=world["manifest"], out=url)


def test_inspect_reports_the_pixels_bytes_per_view(world):
    from stages.inspect_store import format_info, inspect_store

    info = inspect_store(world["kept"])
    got = info["student_pixels"]["bytes_per_view"]
    assert got == info["arrays"]["student_pixels"]["bytes_per_view"]
    raw = 22 * 3 * 4 * 4
    assert 0 < got < raw + 64, got  # lossless, never much above raw (chunk and index overhead only)
    shown = f"{got:.0f} B" if got < 1000 else f"{got / 1000:.1f} KB"
    assert f"student pixels {shown} per view of it: 32 px views, 4 px patches, bicubic" in format_info(info)


def test_hint_reproduces_the_pixel_options(world, tmp_path):
    """The fix-it command of a store with pixels (other size and filter) makes an identical store."""
    from pipeline.targets.hints import extract_command

    url = extract(_mim(world["manifest"], tmp_path / "a.zarr", student_img_size=64, student_interpolation="bilinear",
                       views=1))
    hint = extract_command(TargetStore.open(url).attrs, manifest=world["manifest"], out=str(tmp_path / "b.zarr"))
    assert "--student-pixels --student-img-size 64 --student-interpolation bilinear" in hint
    assert main(shlex.split(hint)[1:] + ["--no-progress", "--batch-size", "3"]) == 0
    a, b = _read(url, ["student_pixels", "relations"]), _read(str(tmp_path / "b.zarr"), ["student_pixels", "relations"])
    np.testing.assert_array_equal(a["student_pixels"], b["student_pixels"])


def test_an_older_store_without_pixels_is_resumed_as_it_is(world, tmp_path):
    """Pixels are the default now; re-running the command of a store made without them finishes
    that store (no rebuild), and --student-pixels then refuses it unless --overwrite."""
    from pipeline.errors import StoreError

    cfg = _mim(world["manifest"], tmp_path / "old.zarr", views=1)
    url = extract(dataclasses.replace(cfg, student_pixels=False))
    marker = (tmp_path / "old.zarr" / "done" / "000000.json").read_bytes()
    (tmp_path / "old.zarr" / "done" / "000002.json").unlink()  # interrupted
    assert extract(cfg) == url
    store = TargetStore.open(url)
    assert store.missing_shards() == [] and "student_pixels" not in store.arrays
    assert (tmp_path / "old.zarr" / "done" / "000000.json").read_bytes() == marker
    with pytest.raises(StoreError, match="student_pixels.*--overwrite"):
        extract(dataclasses.replace(cfg, student_pixels=True))
    extract(dataclasses.replace(cfg, student_pixels=True, overwrite=True))
    assert "student_pixels" in TargetStore.open(url).arrays


def _cli_args(manifest: str, out: Path) -> list[str]:
    return ["extract", "--manifest", manifest, "--teacher", MIM, "--role", "mim", "--random-init", "--model-kwargs",
            '{"img_size": 32, "patch_size": 4, "depth": 3}', "--views", "1", "--device", "cpu", "--no-progress",
            "--out", str(out)]


@pytest.mark.parametrize("args,fragment", [
    (["--student-img-size", "30"], "--student-img-size 30 does not split into the teacher's 8x8 patch grid"),
    (["--student-img-size", "0"], "student_img_size must be >= 1"),
    (["--no-student-pixels", "--student-img-size", "32"], "--student-img-size .* drop it with --no-student-pixels"),
    (["--student-interpolation", "area"], "'area' is not one of"),
])
def test_option_errors_name_the_option(world, tmp_path, capsys, args, fragment):
    import re

    assert main(_cli_args(world["manifest"], tmp_path / "x.zarr") + args) == 2
    assert re.search(fragment, capsys.readouterr().err)
    assert not (tmp_path / "x.zarr").exists()


def test_discriminative_stores_hold_no_pixels(world, tmp_path):
    base = dict(manifest=world["manifest"], teacher=DISC, role="disc", random_init=True, model_kwargs=KW,
                mim_store=world["kept"], batch_size=8, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="--student-pixels.*discriminative"):
        extract(ExtractConfig(**base, out=str(tmp_path / "d.zarr"), student_pixels=True))
    url = extract(ExtractConfig(**base, out=str(tmp_path / "d.zarr")))
    assert "student_pixels" not in TargetStore.open(url).arrays


def test_cli_no_student_pixels(world, tmp_path):
    assert main(_cli_args(world["manifest"], tmp_path / "off.zarr") + ["--no-student-pixels"]) == 0
    assert "student_pixels" not in TargetStore.open(str(tmp_path / "off.zarr")).arrays


def test_verify_renders_the_pixels_again_and_catches_one_changed_value(world, tmp_path):
    import shutil

    from stages.verify import VerifyConfig, verify

    report = verify(VerifyConfig(store=world["kept"], manifest=world["manifest"], samples=20, device="cpu"))
    assert report["ok"] and report["arrays"]["student_pixels"]["max_abs"] == 0, report
    copy = tmp_path / "kept.zarr"
    shutil.copytree(world["kept"], copy)
    store = TargetStore.open(str(copy), mode="r+")
    arrays = store.read_shard(1)
    arrays["student_pixels"][2, 1, 5, 0, 1, 1] ^= 1  # one bit of one pixel
    store.write_shard(1, arrays, {})
    report = verify(VerifyConfig(store=str(copy), manifest=world["manifest"], samples=20, device="cpu"))
    assert not report["ok"] and not report["arrays"]["student_pixels"]["ok"]
    assert report["arrays"]["student_pixels"]["max_abs"] == 1 and report["arrays"]["relations"]["ok"]
