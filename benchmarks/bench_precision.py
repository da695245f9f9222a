"""Bytes per view and relative error vs fp32 for each store precision (not a test).

Targets are produced the way `hdpipe extract` makes them, by the pipeline's own modules: views from
`pipeline.data.views` (RandomResizedCrop + flip), MIM relations (raw Q·Kᵀ of the last two blocks),
progressive masks (`pipeline.targets.masking`, K = 0.3) and final-norm features of the same kept
tokens. Two teacher settings:

- `random` (default): ViT-B defaults, `load_teacher("mae")` and `load_teacher("clip")` with RANDOM
  INIT (no hub here) on scikit-image's bundled photographs: 12 heads, blocks 10-11, 196 -> 67 kept
  patches (T = 68 tokens with CLS), 768-d features. The conservative case: pretrained targets
  are more structured.
- `--trained DIR`: the small teachers the quality study pretrains here on Fashion-MNIST
  (`benchmarks/quality/study.py` writes DIR/mim.pth, an MAE-style encoder, and DIR/disc.pth, a
  supervised one; 12 blocks, 192-d, 3 heads, 28 px / patch 4: 49 patches -> 17 kept, T = 18),
  on Fashion-MNIST test images (idx files under /usr/share/datasets/fashion-mnist).

Each precision is written through a real `TargetStore` on local disk, laid out as extraction lays
it out (q1pct: relations with a token subspace per view, features with a channel basis fitted on
shard 0). Bytes per view are what the store's shards occupy on disk; what a store keeps once (the
channel basis) is reported apart. Error is ||x_hat - x||_2 / ||x||_2 recorded at write time.
Encode = `write_shard` per view (quantization, error check, compression, disk); decode = one view's
parts decoded to float32 as the stage-two loader does (median over views, after reading).

    python benchmarks/bench_precision.py [--images 16] [--views 2] [--out benchmarks/results/precision.json]
    python benchmarks/bench_precision.py --trained /tmp/hdpipe-quality/teachers --images 64 \
        --out benchmarks/results/precision-trained.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.targets import quant
from pipeline.data.manifest import Manifest, ShardInfo
from pipeline.targets.masking import kept_count, mask_layers, progressive_keep
from pipeline.targets.schema import ArraySpec
from pipeline.targets.store import TargetStore
from stages.inspect_store import store_info
from pipeline.targets.teachers import load_teacher
from pipeline.data.views import ViewPlan, render

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "camera", "coins", "moon", "clock", "brick", "grass", "gravel", "horse")
TARGET_KB, TARGET_ERR = 100.0, 0.01  # the goal for the compact mode, per view, both arrays


def photos(n: int) -> list[Image.Image]:
    from skimage import data as skd

    out = []
    for name in (PHOTOS * (n // len(PHOTOS) + 1))[:n]:
        a = np.asarray(getattr(skd, name)())
        if a.dtype != np.uint8:
            a = (a * 255).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
        out.append(Image.fromarray(a).convert("RGB"))
    return out


def fashion_images(n: int) -> list[Image.Image]:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "quality"))
    from fashion import load_split

    x, _ = load_split(Path("/usr/share/datasets/fashion-mnist"), "test")
    return [Image.fromarray(a).convert("RGB") for a in x[:n]]


def trained_teachers(folder: Path):
    """The quality study's pretrained small teachers (MAE-style MIM, supervised disc)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "quality"))
    from teachers import MEAN, STD

    kwargs = {"img_size": 28, "patch_size": 4, "depth": 12, "num_classes": 0}
    mim = load_teacher("timm:vit_tiny_patch16_224", checkpoint=folder / "mim.pth", model_kwargs=kwargs,
                       device="auto", mean=MEAN, std=STD)
    disc = load_teacher("timm:vit_tiny_patch16_224", checkpoint=folder / "disc.pth", model_kwargs=kwargs,
                        device="auto", mean=MEAN, std=STD)
    return mim, disc


def make_targets(n_images: int, views: int, batch: int = 8, trained: Path | None = None) -> dict[str, np.ndarray]:
    """relations [n, V, 2, H, T, T], features [n, V, T, D], views, keep (float32 / ints)."""
    if trained is None:
        mae = load_teacher("mae", random_init=True, device="auto")
        clip = load_teacher("clip", random_init=True, device="auto")
        images = photos(n_images)
    else:
        mae, clip = trained_teachers(trained)
        images = fashion_images(n_images)
    plan = ViewPlan(seed=0, views=views, size=mae.img_size)
    layers = (mae.depth - 2, mae.depth - 1)
    mlayers = mask_layers(mae.depth)
    boxes, xs = [], []
    for i, im in enumerate(images):
        for v in range(views):
            view = plan.view(i, v, im.width, im.height)
            boxes.append(view.as_row())
            xs.append(render(im, view, mae.img_size))
    x01 = torch.stack(xs)  # [n*V, 3, 224, 224] in [0, 1]
    rel, feat, keep = [], [], []
    for s in range(0, len(x01), batch):
        xb = x01[s : s + batch]
        out = mae.forward_targets(mae.normalize(xb.to(mae.device)), relation_layers=layers, hidden_layers=mlayers,
                                  features=False)
        kp = progressive_keep(out["hidden"], mlayers, 0.3)  # [B, n_keep] patch indices
        tok = torch.cat([torch.zeros_like(kp[:, :1]), kp + 1], 1).long()  # [B, 68]: CLS + kept
        r = torch.stack([out["relations"][layer] for layer in layers], 1)  # [B, 2, 12, 197, 197]
        r = r.gather(3, tok[:, None, None, :, None].expand(-1, r.shape[1], r.shape[2], -1, r.shape[4]))
        r = r.gather(4, tok[:, None, None, None, :].expand(-1, r.shape[1], r.shape[2], r.shape[3], -1))
        f = clip.forward_targets(clip.normalize(xb.to(clip.device)), features=True)["features"]  # [B, 197, 768]
        f = f.gather(1, tok.to(f.device)[:, :, None].expand(-1, -1, f.shape[-1]))
        rel.append(r.cpu().numpy())
        feat.append(f.cpu().numpy())
        keep.append(kp.cpu().numpy())
    n, V = n_images, views
    assert kp.shape[1] == kept_count(mae.num_patches, 0.3)
    return {
        "relations": np.concatenate(rel).reshape(n, V, *rel[0].shape[1:]).astype(np.float32),
        "features": np.concatenate(feat).reshape(n, V, *feat[0].shape[1:]).astype(np.float32),
        "views": np.stack(boxes).reshape(n, V, 5).astype(np.float32),
        "keep_progressive": np.concatenate(keep).reshape(n, V, -1).astype(np.int16),
    }


def measure(targets: dict[str, np.ndarray], precision: str, shard_size: int, root: Path) -> dict:
    n, V = targets["relations"].shape[:2]
    shards = tuple(ShardInfo(f"b-{k:06d}.tar", min(shard_size, n - k * shard_size), k * shard_size, f"{k:064x}")
                   for k in range((n + shard_size - 1) // shard_size))
    manifest = Manifest(name="bench", shard_size=shard_size, total=n, shards=shards, class_map=None)
    # As extraction lays them out (`pipeline.targets.layout`): q1pct predicts features from a channel basis.
    specs = {"relations": ArraySpec(targets["relations"].shape[2:], "float32", precision),
             "features": ArraySpec(targets["features"].shape[2:], "float32", precision, channel_basis=True)}
    specs["views"] = ArraySpec((5,), "float32")
    specs["keep_progressive"] = ArraySpec(targets["keep_progressive"].shape[2:], "int16")
    attrs = {"teacher": "mae+clip (random init)", "weights_digest": "-", "preprocessing": {}, "precision": precision,
             "tokens": "kept", "view_plan_digest": "-"}
    url = str(root / f"{precision}.zarr")
    store = TargetStore.create(url, attrs, specs, manifest, V, overwrite=True)
    t0 = time.perf_counter()
    for k in range(manifest.num_shards):
        first, count = store.shard_rows(k)
        store.write_shard(k, {name: a[first : first + count] for name, a in targets.items()}, {})
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in range(manifest.num_shards):
        store.read_shard(k)
    read_s = time.perf_counter() - t0
    # What the loader pays per sample: one view's stored parts decoded (median over views).
    reader = TargetStore.open(url)
    decode_ms = {}
    for name in ("relations", "features"):
        got = reader.read_shard_views(0, [name], np.zeros(manifest.shards[0].count, np.int64))[name]
        times = []
        for r in range(manifest.shards[0].count):
            t0 = time.perf_counter()
            reader.decode_rows(name, {p: a[r] for p, a in got.items()})
            times.append(time.perf_counter() - t0)
        decode_ms[name] = 1000 * float(np.median(times))
    info = store_info(store)
    row = {"precision": precision, "write_ms_per_view": 1000 * write_s / (n * V),
           "read_ms_per_view": 1000 * read_s / (n * V),
           "decode_ms_per_view": decode_ms, "store_level_bytes": info["store_level_bytes"]}
    for name in ("relations", "features", "views", "keep_progressive"):
        e = info["arrays"][name]
        row[f"{name}_bytes_per_view"] = e["bytes_per_view"]
        if "relative_error" in e:
            row[f"{name}_relative_error"] = e["relative_error"]
            row[f"{name}_max_view_relative_error"] = e["max_view_relative_error"]
    row["targets_bytes_per_view"] = row["relations_bytes_per_view"] + row["features_bytes_per_view"]
    row["total_bytes_per_view"] = info["bytes_per_view"]
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16, help="photos (one sample each)")
    p.add_argument("--views", type=int, default=2, help="views per photo")
    p.add_argument("--shard-size", type=int, default=8, help="samples per store shard")
    p.add_argument("--trained", type=Path, default=None,
                   help="folder with the quality study's mim.pth and disc.pth (trained small teachers)")
    p.add_argument("--out", default="benchmarks/results/precision.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    targets = make_targets(args.images, args.views, trained=args.trained)
    extract_s = time.perf_counter() - t0
    raw = {name: targets[name][0, 0].size for name in ("relations", "features")}
    root = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    try:
        rows = [measure(targets, prec, args.shard_size, root) for prec in quant.PRECISIONS]
    finally:
        shutil.rmtree(root)
    header = (f"{'precision':<10}{'relations':>11}{'features':>10}{'targets':>10}{'rel. err':>10}{'feat. err':>10}"
              f"{'worst view':>11}{'encode ms/v':>12}{'decode ms/v':>12}")
    setting = ("ViT-B defaults, random-init teachers" if args.trained is None
               else f"trained small teachers from {args.trained}, Fashion-MNIST")
    print(f"{setting}: relations {list(targets['relations'].shape[2:])} ({raw['relations']} values), "
          f"features {list(targets['features'].shape[2:])} ({raw['features']} values), "
          f"{args.images} images x {args.views} views; KB = 1000 bytes per view on disk")
    print(header)
    for r in rows:
        worst = max(r.get("relations_max_view_relative_error", 0), r.get("features_max_view_relative_error", 0))
        dec = sum(r["decode_ms_per_view"].values())
        print(f"{r['precision']:<10}{r['relations_bytes_per_view'] / 1e3:>10.1f}K"
              f"{r['features_bytes_per_view'] / 1e3:>9.1f}K"
              f"{r['targets_bytes_per_view'] / 1e3:>9.1f}K"
              f"{100 * r['relations_relative_error']:>9.3f}%{100 * r['features_relative_error']:>9.3f}%"
              f"{100 * worst:>10.3f}%{r['write_ms_per_view']:>12.1f}{dec:>12.2f}")
        for part, b in r["store_level_bytes"].items():
            print(f"{'':<10}kept once per store: {part} {b / 1e3:.1f} KB "
                  f"({b / (args.images * args.views):.0f} B per view here, {b / 1.28e6:.2f} B per view at 1.28M views)")
    compact = next(r for r in rows if r["precision"] == "q1pct")
    meets = (compact["targets_bytes_per_view"] <= TARGET_KB * 1000
             and max(compact["relations_max_view_relative_error"],
                     compact["features_max_view_relative_error"]) <= TARGET_ERR)
    print(f"compact mode q1pct: {compact['targets_bytes_per_view'] / 1e3:.1f} KB per view of targets "
          f"(goal <= {TARGET_KB:.0f} KB at <= {100 * TARGET_ERR:.0f}% error at ViT-B defaults): "
          f"{'met' if meets else 'NOT met'}")
    result = {
        "benchmark": "precision",
        "setting": {"images": args.images, "views": args.views, "relations_shape": list(targets["relations"].shape[2:]),
                    "features_shape": list(targets["features"].shape[2:]),
                    "teachers": ("mae + clip, random init" if args.trained is None
                                 else f"trained small teachers ({args.trained})"),
                    "data": ("scikit-image photographs" if args.trained is None else "Fashion-MNIST test images")
                    + ", RandomResizedCrop views", "kb": 1000},
        "raw_fp32_bytes_per_view": {k: 4 * v for k, v in raw.items()},
        "rows": rows,
        "compact_meets_goal": meets,
        "extract_seconds": extract_s,
        "host": {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
