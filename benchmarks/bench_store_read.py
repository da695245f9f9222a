"""What one epoch's target read costs per row as a store holds more views (not a test).

    python benchmarks/bench_store_read.py [--views 1 4 8] [--rows 64]

Stage two reads one view of every row per epoch (`TargetStore.read_shard_views`). hdpipe's stores
keep every view of a sample in one Zarr chunk (chunks (1, V, ...) inside shards (S, V, ...)), so a
read decompresses all V views to keep one. The alternative layout, a chunk per (sample, view), reads
only the chosen view's bytes but makes one partial shard read per chunk. Both are measured here on
raw Zarr arrays with the store's own codecs (`pipeline.targets.schema.codecs`): fp16 relations
[2, 6, 68, 68] and features [68, 384] per view (ViT-S teachers, [CLS] + 67 kept tokens), a shard of
`--rows` rows, each row showing a random view. Gaussian values: fp16 targets are near-incompressible,
as real ones are. Prints CPU ms per row and writes benchmarks/results/store_read.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

TAILS = {"relations": (2, 6, 68, 68), "features": (68, 384)}


def whole_chunks(arr, views: np.ndarray) -> np.ndarray:
    """hdpipe's read for (1, V) chunks: the shard's rows with all their views, then one view per row."""
    rows = arr[0:len(views)]
    return rows[np.arange(len(views)), views]


def per_view_reads(arr, views: np.ndarray) -> np.ndarray:
    """One orthogonal read per view id (Zarr reads only those chunks out of the shard)."""
    out = np.empty((len(views),) + arr.shape[2:], arr.dtype)
    for v in np.unique(views):
        rows = np.flatnonzero(views == v)
        out[rows] = arr.get_orthogonal_selection((rows, int(v)))
    return out


def measure(V: int, S: int, repeats: int = 3) -> dict:
    import zarr

    from pipeline.targets.schema import codecs

    rng = np.random.default_rng(0)
    views = rng.integers(0, V, S)
    folder = tempfile.TemporaryDirectory(prefix="bench-store-read-")
    root = zarr.open_group(folder.name, mode="w")
    layouts = {"chunk (1, V): all views of a sample": ((1, V), whole_chunks),
               "chunk (1, 1): one view": ((1, 1), per_view_reads)}
    data = {n: rng.normal(size=(S, V) + t).astype(np.float16) for n, t in TAILS.items()}
    out = {}
    for i, (label, (lead, read)) in enumerate(layouts.items()):
        arrays = []
        for name, tail in TAILS.items():
            a = root.create_array(f"layout{i}_{name}", shape=(S, V) + tail, chunks=lead + tail, shards=(S, V) + tail,
                                  dtype="float16", compressors=codecs(np.dtype("float16")), fill_value=0)
            a[:] = data[name]
            arrays.append((a, data[name][np.arange(S), views]))
        for a, want in arrays:  # the layouts read the same values
            np.testing.assert_array_equal(read(a, views), want)
        best = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            for a, _ in arrays:
                read(a, views)
            best = min(best, time.process_time() - t)
        out[label] = 1e3 * best / S
    folder.cleanup()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rows", type=int, default=64, help="rows per shard")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/store_read.json"))
    args = p.parse_args()
    results = {V: measure(V, args.rows) for V in args.views}
    layouts = list(next(iter(results.values())))
    print(f"CPU ms per row to read one view (fp16 relations + features, ViT-S, shard of {args.rows} rows), best of 3")
    print(f"{'stored views':>12}  " + "  ".join(f"{label:>36}" for label in layouts))
    for V, r in results.items():
        print(f"{V:>12}  " + "  ".join(f"{r[label]:>36.3f}" for label in layouts))
    import zarr

    report = {"benchmark": "one-view target reads vs stored views and chunk layout", "rows": args.rows,
              "per_view_bytes": {n: int(np.prod(t)) * 2 for n, t in TAILS.items()},
              "ms_per_row": {str(V): r for V, r in results.items()},
              "machine": {"platform": platform.platform(), "zarr": zarr.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
