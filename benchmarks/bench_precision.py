"""Bytes per view and relative error vs fp32 for each store precision, at ViT-B defaults.

Targets are produced the way `hdpipe extract` makes them, by the pipeline's own modules: views from
`pipeline.data.views` (RandomResizedCrop + flip) of scikit-image's bundled photographs, MIM relations
(raw Q·Kᵀ, blocks 10 and 11 of 12, 12 heads) from `load_teacher("mae")`, progressive masks
(`pipeline.targets.masking`, K = 0.3: 196 -> 67 kept, T = 68 tokens with CLS), and final-norm features
(768-d, same 68 tokens) from `load_teacher("clip")`. Weights are RANDOM INIT (no hub here), so the
numbers describe random-init transformers, not pretrained MAE/CLIP, whose targets are more
structured. Each precision is written through a real `TargetStore` on local disk; bytes are what
the store's chunks occupy on disk, the error is ||x_hat - x||_2 / ||x||_2 recorded at write time.

    python benchmarks/bench_precision.py [--images 16] [--views 2] [--out benchmarks/results/precision.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
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


def make_targets(n_images: int, views: int, batch: int = 8) -> dict[str, np.ndarray]:
    """relations [n, V, 2, 12, 68, 68], features [n, V, 68, 768], views, keep (float32 / ints)."""
    mae = load_teacher("mae", random_init=True, device="auto")
    clip = load_teacher("clip", random_init=True, device="auto")
    plan = ViewPlan(seed=0, views=views, size=mae.img_size)
    layers = (mae.depth - 2, mae.depth - 1)
    mlayers = mask_layers(mae.depth)
    images = photos(n_images)
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
        out = mae.forward_targets(mae.normalize(xb.to(mae.device)), relation_layers=layers, hidden_layers=mlayers, features=False)
        kp = progressive_keep(out["hidden"], mlayers, 0.3)  # [B, 67] patch indices
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
    assert kept_count(196, 0.3) == 67
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
    specs = {name: ArraySpec(targets[name].shape[2:], "float32", precision) for name in ("relations", "features")}
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
    info = store_info(store)
    row = {"precision": precision, "write_ms_per_view": 1000 * write_s / (n * V), "read_ms_per_view": 1000 * read_s / (n * V)}
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
    p.add_argument("--out", default="benchmarks/results/precision.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    targets = make_targets(args.images, args.views)
    extract_s = time.perf_counter() - t0
    raw = {name: targets[name][0, 0].size for name in ("relations", "features")}
    root = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    try:
        rows = [measure(targets, prec, args.shard_size, root) for prec in quant.PRECISIONS]
    finally:
        shutil.rmtree(root)
    header = f"{'precision':<10}{'relations':>12}{'features':>12}{'targets':>12}{'all arrays':>12}{'rel. err':>10}{'feat. err':>10}{'worst view':>12}{'write ms/v':>12}"
    print(f"ViT-B defaults: relations {list(targets['relations'].shape[2:])} ({raw['relations']} values), "
          f"features {list(targets['features'].shape[2:])} ({raw['features']} values), "
          f"{args.images} images x {args.views} views, random-init teachers; KB = 1000 bytes per view on disk")
    print(header)
    for r in rows:
        worst = max(r.get("relations_max_view_relative_error", 0), r.get("features_max_view_relative_error", 0))
        print(f"{r['precision']:<10}{r['relations_bytes_per_view'] / 1e3:>11.1f}K{r['features_bytes_per_view'] / 1e3:>11.1f}K"
              f"{r['targets_bytes_per_view'] / 1e3:>11.1f}K{r['total_bytes_per_view'] / 1e3:>11.1f}K"
              f"{100 * r['relations_relative_error']:>9.3f}%{100 * r['features_relative_error']:>9.3f}%"
              f"{100 * worst:>11.3f}%{r['write_ms_per_view']:>12.1f}")
    compact = next(r for r in rows if r["precision"] == "q1pct")
    meets = (compact["targets_bytes_per_view"] <= TARGET_KB * 1000
             and max(compact["relations_max_view_relative_error"], compact["features_max_view_relative_error"]) <= TARGET_ERR)
    print(f"compact mode q1pct: {compact['targets_bytes_per_view'] / 1e3:.1f} KB per view of targets "
          f"(goal <= {TARGET_KB:.0f} KB at <= {100 * TARGET_ERR:.0f}% error): {'met' if meets else 'NOT met'}")
    result = {
        "benchmark": "precision",
        "setting": {"images": args.images, "views": args.views, "relations_shape": list(targets["relations"].shape[2:]),
                    "features_shape": list(targets["features"].shape[2:]), "teachers": "mae + clip, random init",
                    "data": "scikit-image photographs, RandomResizedCrop views", "kb": 1000},
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
