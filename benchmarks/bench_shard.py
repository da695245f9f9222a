"""Throughput of `hdpipe shard` and of reading shards back (not a test).

    python benchmarks/bench_shard.py [--images 600] [--workers 1 2]

Writes `--images` ImageNet-like JPEGs (500x375, quality 90, smooth random content ~20-40 KB) to a
temporary class-folder tree, shards them with each worker count (every image is read, sniffed and
fully decoded before it is stored), then reads the shards back with `iter_shard` (decode to PIL RGB)
(the tar's sha256 checked as it is read). Prints a table and writes
benchmarks/results/shard.json. ImageNet-1k train is 1.28 M images: divide by the img/s shown.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _make_tree(root: Path, n: int) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        d = root / f"n{i % 10:08d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:06d}.JPEG").write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "shard.json"))
    args = ap.parse_args(argv)

    from pipeline.data.reading import iter_shard
    from pipeline.data.manifest import read_manifest
    from stages.shard import ShardConfig, shard

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        nbytes = _make_tree(root, args.images)
        manifest = None
        for w in args.workers:
            t0 = time.perf_counter()
            manifest = shard(ShardConfig(input=str(root), name=f"b{w}", out_dir=os.path.join(tmp, "out"),
                                         manifest=os.path.join(tmp, f"b{w}.json"), shard_size=args.shard_size,
                                         workers=w, progress=False))
            dt = time.perf_counter() - t0
            rows.append({"what": f"shard (check+write), workers={w}", "images": args.images, "seconds": dt,
                         "img_per_s": args.images / dt, "MB_per_s": nbytes / 1e6 / dt})
        m = read_manifest(manifest)
        t0 = time.perf_counter()
        n = sum(1 for k in range(m.num_shards) for _ in iter_shard(m, k))
        dt = time.perf_counter() - t0
        rows.append({"what": "iter_shard decode->RGB, 1 process", "images": n, "seconds": dt, "img_per_s": n / dt,
                     "MB_per_s": nbytes / 1e6 / dt})

    print(f"{'what':45s} {'images':>7s} {'s':>7s} {'img/s':>8s} {'MB/s':>7s}")
    for r in rows:
        print(f"{r['what']:45s} {r['images']:7d} {r['seconds']:7.2f} {r['img_per_s']:8.1f} {r['MB_per_s']:7.1f}")
    result = {"benchmark": "shard", "rows": rows, "mean_jpeg_kb": nbytes / args.images / 1e3,
              "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "note": "2-core machine shared with other jobs while measured; treat as a lower bound"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
