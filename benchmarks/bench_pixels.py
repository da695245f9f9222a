"""Bytes per view the student's pixels add to a MIM store, and the codec they are stored with (not a test).

Two parts:

- `codecs`: lossless Zarr codecs on rendered uint8 views laid out as the store lays them out
  ([N, V, K, 3, p, p], chunk (1, V, ...), one shard): the two codecs stores use
  (`schema.pixel_compression`: Blosc zstd 1 in q1pct stores, lz4 in fp16/int8 ones, no shuffle),
  Blosc bitshuffle (the best in the Zarr v3 core spec), plain zstd 9, and numcodecs' delta filter
  before zstd 3 or 9 (once chosen, dropped for its decode time: `schema.py`). Inputs: crops of the bundled
  sample rendered at the demo teacher's 64 px (8 px patches, 22 of 64 kept) and at 224 px (16 px
  patches, 67 of 196 kept); scikit-image's full photos rendered at 224 px (67 kept, and all 196).
  Kept patches are a random set here (the masks need a teacher; any K patches compress alike).
- `stores`: real `extract()` runs (random-init timm teachers) with and without `--student-pixels`:
  bytes per view from `hdpipe inspect`'s numbers, and the extraction time each way. Bundled sample at
  the demo's teacher (params.yaml extract_mim: 64 px, 8 px patches, depth 6) and at a 224 px teacher
  (vit_tiny_patch16_224, depth 3: the geometry of ViT-B/16, fewer blocks to keep this CPU-sized);
  the full photos (PNG tars) at the 224 px teacher.

    OMP_NUM_THREADS=1 python benchmarks/bench_pixels.py [--sample 128] [--out benchmarks/results/pixels.json]
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from PIL import Image
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.codecs.numcodecs import Delta

from pipeline.data.views import ViewPlan, render_uint8
from pipeline.targets import schema

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field",
          "motorcycle")


def _blosc(level: int, shuffle: str) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=1)


CODECS = {
    "blosc zstd1 noshuffle (q1pct stores)": schema.array_codecs(schema.ArraySpec((1,), "uint8", pixels=True),
                                                                np.dtype(np.uint8), "q1pct"),
    "blosc lz4 noshuffle (fp16/int8 stores)": schema.array_codecs(schema.ArraySpec((1,), "uint8", pixels=True),
                                                                  np.dtype(np.uint8), "fp16"),
    "blosc zstd3 bitshuffle": {"compressors": [_blosc(3, "bitshuffle"), Crc32cCodec()]},
    "zstd9": {"compressors": [ZstdCodec(level=9), Crc32cCodec()]},
    "delta + blosc zstd3": {"filters": [Delta(dtype="uint8")], "compressors": [_blosc(3, "noshuffle"), Crc32cCodec()]},
    "delta + blosc zstd9": {"filters": [Delta(dtype="uint8")], "compressors": [_blosc(9, "noshuffle"), Crc32cCodec()]},
}


def sample_images(n: int) -> list[Image.Image]:
    from pipeline.data.bundled import SampleSpec, iter_split

    out = []
    for rec in iter_split(SampleSpec(train_count=n), "train"):
        out.append(Image.open(io.BytesIO(rec.data)).convert("RGB"))
    return out


def photos() -> list[Image.Image]:
    from skimage import data as skd

    out = []
    for name in PHOTOS:
        a = skd.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skd, name)()
        out.append(Image.fromarray(np.asarray(a)[..., :3]).convert("RGB"))
    return out


def rendered(images: list[Image.Image], size: int, grid: int, keep: int | None, views: int = 2) -> np.ndarray:
    """[N, V, K, 3, p, p] uint8: each view's patches (a random K of them, or all) as the store holds them."""
    plan = ViewPlan(seed=0, views=views, size=size)
    rng = np.random.default_rng(0)
    p, out = size // grid, []
    for i, im in enumerate(images):
        row = []
        for v in range(views):
            x = render_uint8(im, plan.view(i, v, *im.size), size).numpy()
            tiles = x.reshape(3, grid, p, grid, p).transpose(1, 3, 0, 2, 4).reshape(grid * grid, 3, p, p)
            ids = np.arange(grid * grid) if keep is None else np.sort(rng.choice(grid * grid, keep, replace=False))
            row.append(tiles[ids])
        out.append(np.stack(row))
    return np.stack(out)


def codec_rows(a: np.ndarray) -> dict:
    n, v = a.shape[:2]
    out = {}
    for name, kw in CODECS.items():
        store = zarr.storage.MemoryStore()
        arr = zarr.open_group(store=store, mode="w").create_array(
            "x", shape=a.shape, chunks=(1, v) + a.shape[2:], shards=a.shape, dtype=np.uint8, fill_value=0, **kw)
        t0 = time.perf_counter()
        arr[:] = a
        t1 = time.perf_counter()
        back = arr[:]
        t2 = time.perf_counter()
        assert np.array_equal(back, a), name
        nbytes = sum(len(b.to_bytes()) for k, b in store._store_dict.items() if k.startswith("x/c"))
        out[name] = {"bytes_per_view": round(nbytes / (n * v)), "of_raw": round(nbytes / a.nbytes, 3),
                     "write_ms_per_view": round((t1 - t0) / (n * v) * 1e3, 3),
                     "read_ms_per_view": round((t2 - t1) / (n * v) * 1e3, 3)}
    return out


def store_rows(root: Path, manifest: str, teacher: dict, views: int) -> dict:
    from stages.extract import ExtractConfig, extract
    from stages.inspect_store import inspect_store

    out = {}
    for run, pixels in enumerate((False, False, True)):  # the first builds the teacher (cached): not timed
        cfg = ExtractConfig(manifest=manifest, role="mim", random_init=True, views=views, batch_size=32, device="cpu",
                            progress=False, student_pixels=pixels, out=str(root / f"s-{run}.zarr"), **teacher)
        t0 = time.perf_counter()
        info = inspect_store(extract(cfg))
        if run == 0:
            continue
        out["with" if pixels else "without"] = {
            "seconds": round(time.perf_counter() - t0, 2), "bytes_per_view": round(info["bytes_per_view"]),
            **({"student_pixels": info["student_pixels"]} if pixels else {})}
    px = out["with"]["student_pixels"]
    tile = px["patch_size"] ** 2 * 3
    out["pixels_bytes_per_view"] = round(px["bytes_per_view"])
    out["raw_bytes_per_patch"] = tile
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sample", type=int, default=128, help="bundled-sample training crops")
    p.add_argument("--out", default="benchmarks/results/pixels.json")
    args = p.parse_args(argv)
    sample, full = sample_images(args.sample), photos()
    inputs = {
        "bundled sample, 64 px views, 8 px patches, 22 of 64 kept": rendered(sample, 64, 8, 22),
        "bundled sample, 224 px views, 16 px patches, 67 of 196 kept": rendered(sample, 224, 14, 67),
        "full photos, 224 px views, 16 px patches, 67 of 196 kept": rendered(full * 8, 224, 14, 67),
        "full photos, 224 px views, 16 px patches, all 196": rendered(full * 8, 224, 14, None),
    }
    result: dict = {"codecs": {}, "stores": {}, "machine": f"{platform.machine()}, {platform.processor() or '?'}"}
    for name, a in inputs.items():
        result["codecs"][name] = {"raw_bytes_per_view": int(a[0, 0].nbytes), **codec_rows(a)}
        print(f"{name}: raw {a[0, 0].nbytes} B per view")
        for codec, r in result["codecs"][name].items():
            if isinstance(r, dict):
                print(f"  {codec:<40}{r['bytes_per_view']:>8} B ({r['of_raw']:.1%})  write {r['write_ms_per_view']:.3f}"
                      f" ms  read {r['read_ms_per_view']:.3f} ms per view")

    from stages.shard import ShardConfig, shard

    root = Path(tempfile.mkdtemp(prefix="bench_pixels_"))
    try:
        sample_manifest = shard(ShardConfig(sample=True, sample_train=args.sample, sample_probe_train=1,
                                            sample_probe_test=1, out_dir=str(root / "shards"), progress=False,
                                            manifest=str(root / "sample.json")))
        folder = root / "photos"
        folder.mkdir()
        for i, im in enumerate(full):
            im.save(folder / f"{PHOTOS[i]}.png")
        photo_manifest = shard(ShardConfig(input=str(folder), out_dir=str(root / "shards"), progress=False,
                                           manifest=str(root / "photos.json")))
        demo = {"teacher": "timm:vit_small_patch16_224", "model_kwargs": {"img_size": 64, "patch_size": 8, "depth": 6}}
        at224 = {"teacher": "timm:vit_tiny_patch16_224", "model_kwargs": {"depth": 3}}
        runs = {"bundled sample, demo teacher (64 px, 8 px patches, 22 kept)": (sample_manifest, demo, 2),
                "bundled sample, 224 px teacher (16 px patches, 67 kept)": (sample_manifest, at224, 2),
                "full photos, 224 px teacher (16 px patches, 67 kept)": (photo_manifest, at224, 4)}
        for j, (name, (manifest, teacher, views)) in enumerate(runs.items()):
            r = store_rows(root / f"stores-{j}", manifest, teacher, views)
            result["stores"][name] = r
            print(f"{name}: student pixels {r['pixels_bytes_per_view']} B per view; store "
                  f"{r['without']['bytes_per_view']} -> {r['with']['bytes_per_view']} B per view; extract "
                  f"{r['without']['seconds']} s -> {r['with']['seconds']} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
