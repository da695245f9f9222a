"""How much the property metrics cost next to the model forward they analyze (not a test).

    python benchmarks/bench_analysis.py [--model timm:vit_base_patch16_224] [--batch 8] [--repeats 3]

One batch of random 224² images through a random-init model (no download), asking for the attention
and block outputs of every block, then the metrics of `hdpipe analyze` on them: attention distance,
NMI, entropy and the token-level spectrum for every layer (the image-level spectrum is one SVD per
layer at the end of a run and is timed separately over the batch). Prints a table and writes
benchmarks/results/analysis.json. Runs on CUDA when present (timings then include synchronization).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pipeline.eval import analysis
from pipeline.device import pick_device
from pipeline.targets.teachers import load_teacher


def _timed(fn, device, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/analysis.json")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    teacher = load_teacher(args.model, random_init=True, device=device)
    layers = tuple(range(1, teacher.depth + 1))
    x = teacher.normalize(torch.rand(args.batch, 3, teacher.img_size, teacher.img_size))
    grid = teacher.grid
    patch_px = teacher.img_size / grid[0]

    t_plain, _ = _timed(lambda: teacher.forward_targets(x, features=True), device, args.repeats)
    t_fwd, out = _timed(lambda: teacher.forward_targets(x, attention_layers=layers, block_layers=layers,
                                                        features=False), device, args.repeats)

    def metrics():
        for layer in layers:
            a, t = out["attention"][layer], out["block"][layer]
            analysis.attention_distance(a, grid, patch_px)
            analysis.attention_nmi(a)
            analysis.attention_entropy(a)
            analysis.singular_spectrum(t, "token")

    t_metrics, _ = _timed(metrics, device, args.repeats)
    t_image, _ = _timed(lambda: [analysis.singular_spectrum(out["block"][layer], "image") for layer in layers],
                        device, args.repeats)
    rows = [
        ("forward, features only", t_plain),
        ("forward + attention/block outputs of all layers", t_fwd),
        ("metrics (distance, NMI, entropy, token spectrum) all layers", t_metrics),
        ("image-level spectrum all layers", t_image),
    ]
    result = {
        "model": args.model, "batch": args.batch, "depth": teacher.depth, "heads": teacher.num_heads,
        "tokens": 1 + grid[0] * grid[1], "device": str(device),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "seconds_per_batch": {name: round(t, 4) for name, t in rows},
        "images_per_second_analyze": round(args.batch / (t_fwd + t_metrics), 2),
        "metrics_over_forward": round(t_metrics / t_fwd, 3),
    }
    print(f"{args.model}  batch {args.batch}  device {device}  threads {torch.get_num_threads()}")
    for name, t in rows:
        print(f"  {name:<62} {t * 1000:9.1f} ms")
    print(f"  analyze throughput {result['images_per_second_analyze']} img/s; metrics/forward = "
          f"{result['metrics_over_forward']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
