"""Store throughput on an object store vs the local file system (not a test).

    python benchmarks/bench_objectstore.py [--images 256] [--shard 64] [--views 4]

Starts moto's S3 server on 127.0.0.1 (s3fs talks to it as to a bucket), extracts the same MIM store
(tiny random-init ViT, fp16) to a local folder and to s3://, then reads every shard back whole as
stage two does (`read_shard_views`), and reports MB/s of store bytes for writing (the store's own
`seconds_store` per shard: encode + write + marker) and reading. A Zarr shard is one object, so an
extraction writes (arrays x parts x shards) objects, not one per view. moto keeps objects in memory
on this machine: the figures show hdpipe's per-object overheads through the real s3fs/zarr stack,
not a real network's bandwidth or latency.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "objectstore.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(folder: Path, n: int, shard: int) -> str:
    import io

    import numpy as np
    from PIL import Image

    from stages.shard import ShardConfig, shard as run_shard

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        (folder / "img" / f"{i:05d}.jpg").write_bytes(buf.getvalue())
    return str(run_shard(ShardConfig(input=str(folder / "img"), name="bench", out_dir=str(folder / "shards"),
                                     manifest=str(folder / "bench.json"), shard_size=shard, progress=False)))


def measure(manifest: str, out: str, views: int) -> dict:
    import numpy as np

    from pipeline.targets.store import TargetStore
    from stages.extract import ExtractConfig, extract
    from stages.inspect_store import bytes_per_view

    t0 = time.perf_counter()
    url = extract(ExtractConfig(manifest=manifest, teacher="timm:vit_tiny_patch16_224", role="mim", random_init=True,
                                model_kwargs={"img_size": 64, "patch_size": 8, "depth": 4}, views=views, out=out,
                                batch_size=64, device="cpu", progress=False))
    extract_s = time.perf_counter() - t0
    store = TargetStore.open(url)
    markers = [store.done_marker(k) for k in range(store.num_shards)]
    stored = sum(m["bytes"] for m in markers)
    write_s = sum(m["seconds_store"] for m in markers)
    names = [n for n, s in store.arrays.items() if s.per_view]
    t0 = time.perf_counter()
    for k in range(store.num_shards):
        rows = store.shard_rows(k)[1]
        store.read_shard_views(k, names, np.zeros(rows, dtype=np.int64))
    read_s = time.perf_counter() - t0
    return {"url": url, "extract_s": extract_s, "stored_bytes": stored, "write_s": write_s,
            "write_mb_per_s": stored / 1e6 / write_s, "read_s": read_s, "read_mb_per_s": stored / 1e6 / read_s,
            "bytes_per_view": bytes_per_view(store)["total"], "objects_per_shard": len(names) + 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--shard", type=int, default=64)
    p.add_argument("--views", type=int, default=4)
    args = p.parse_args()
    port = _free_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for _ in range(100):
            try:
                fs.mkdir("bench")
                break
            except Exception:  # the server is still starting
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            manifest = _dataset(Path(tmp), args.images, args.shard)
            local = measure(manifest, str(Path(tmp) / "store.zarr"), args.views)
            remote = measure(manifest, "s3://bench/store.zarr", args.views)
    finally:
        server.kill()
    result = {"benchmark": "store on moto S3 vs local", "images": args.images, "views": args.views,
              "shard_size": args.shard, "local": local, "s3_moto": remote,
              "write_ratio_s3_over_local": remote["write_mb_per_s"] / local["write_mb_per_s"],
              "read_ratio_s3_over_local": remote["read_mb_per_s"] / local["read_mb_per_s"],
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'where':<10}{'store MB':>10}{'write MB/s':>12}{'read MB/s':>11}{'KB/view':>9}")
    for name, r in (("local", local), ("s3 (moto)", remote)):
        print(f"{name:<10}{r['stored_bytes'] / 1e6:>10.2f}{r['write_mb_per_s']:>12.1f}{r['read_mb_per_s']:>11.1f}"
              f"{r['bytes_per_view'] / 1e3:>9.1f}")
    print(f"s3/local: write {result['write_ratio_s3_over_local']:.2f}, read {result['read_ratio_s3_over_local']:.2f}; "
          f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
