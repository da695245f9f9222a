"""q1pct encode and decode per view: numpy (`pipeline.targets.compact`) vs torch (`compact_torch`) (not a test).

ViT-B shapes: relations [2 layers, 12 heads, 68, 68] per view (T = 68: CLS + 67 kept tokens; the
token-subspace predictor) and features [68, 768] in a channel basis fitted on the data (the
channel-basis predictor). Synthetic targets with a teacher's structure: relations Q·Kᵀ of tokens of
low rank, features with strongly correlated channels. numpy encodes as a store does (`quant.encode`,
blocks of `encode_block` rows); torch encodes a whole batch in one call, as extraction does per
teacher batch. Both give the same bytes (checked here too). Times are the best of `--repeats` runs,
per view, at 1 and 2 threads (torch intra-op and BLAS); on a GPU add `--device cuda`.

    OMP_NUM_THREADS=1 python benchmarks/bench_q1pct_torch.py [--views 64] [--device cpu] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from pipeline.targets import compact, compact_torch, quant


def targets(views: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = (rng.normal(size=(views, 1, 68, 24)) @ rng.normal(size=(24, 64))
              + 0.3 * rng.normal(size=(views, 1, 68, 64))).astype(np.float32)
    wq, wk = (rng.normal(size=(2, 2, 12, 64, 64)) / 8).astype(np.float32)
    q = np.einsum("nvtd,lhde->nvlhte", tokens, wq)
    k = np.einsum("nvtd,lhde->nvlhte", tokens, wk)
    relations = np.einsum("nvlhie,nvlhje->nvlhij", q, k).astype(np.float32)  # [views, 1, 2, 12, 68, 68]
    mix = rng.normal(size=(32, 768)) * np.linspace(4, 0.5, 32)[:, None]
    features = (rng.normal(size=(views, 1, 68, 32)) @ mix + 0.2 * rng.normal(size=(views, 1, 68, 768))
                + rng.normal(size=768)).astype(np.float32)
    return {"relations": relations, "features": features}


def best(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy imports)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, x: np.ndarray, basis: np.ndarray | None, device: torch.device, repeats: int) -> dict:
    n = x.shape[0]
    tx = torch.from_numpy(x).to(device)
    tb = None if basis is None else torch.from_numpy(basis).to(device)
    parts = quant.encode(x, "q1pct", channel_basis=basis)
    got = compact_torch.encode(tx, 2, tb)
    same = all(got[p].cpu().numpy().tobytes() == parts[p].tobytes() for p in parts)
    tparts = {p: torch.from_numpy(a).to(device) for p, a in parts.items()}

    def torch_encode():
        compact_torch.encode(tx, 2, tb)
        sync(device)

    def torch_decode():
        compact_torch.decode(tparts, tb)
        sync(device)

    row = {"array": name, "views": n, "same_bytes": same,
           "stored_bytes_per_view": sum(a.nbytes for a in parts.values()) // n}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            row[f"numpy_encode_ms_{threads}t"] = best(lambda: quant.encode(x, "q1pct", channel_basis=basis), repeats)
            row[f"torch_encode_ms_{threads}t"] = best(torch_encode, repeats)
            row[f"numpy_decode_ms_{threads}t"] = best(lambda: quant.decode(parts, "q1pct", basis), repeats)
            row[f"torch_decode_ms_{threads}t"] = best(torch_decode, repeats)
    for key in list(row):
        if key.endswith("t") and "_ms_" in key:
            row[key] = round(row[key] / n * 1e3, 3)  # per view
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=64, help="views per encode call (extraction: the teacher batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    data = targets(args.views)
    basis = compact.fit_channel_basis(data["features"])
    rows = [measure("relations [2, 12, 68, 68]", data["relations"], None, device, args.repeats),
            measure("features [68, 768] (channel basis)", data["features"], basis, device, args.repeats)]
    for row in rows:
        print(json.dumps(row))
    result = {"device": str(device), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "numpy": np.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
