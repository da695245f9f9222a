"""What a loader worker pays for a batch's fresh shared memory (issue 19; not a test).

A DataLoader worker hands each batch to the training process in shared memory (torch's
`default_collate` allocates it fresh per batch, and so did `pipeline.train.pieces.allocate` before
its `Ring`): the kernel then creates, faults in, zeroes and later frees every page. This times, in CPU ms per batch
of `--mb` MB (24 MB: a batch of 64 ViT-B fp16 target rows with their student patches):

- a fresh shared buffer written once (`UntypedStorage._new_shared`, as a worker does without a free one);
- the same with its pages populated in one call first (`madvise(MADV_POPULATE_WRITE)`);
- a buffer reused, written again (what `pieces.Ring`'s reuse costs).

    python benchmarks/bench_shm.py [--mb 24] [--rounds 40] [--out benchmarks/results/shm.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time
from pathlib import Path

import torch

MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def _fresh(nbytes: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes), 0, (nbytes,))


def _populate(buf: torch.Tensor) -> bool:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    start = buf.data_ptr() & ~4095
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(buf.numel() + buf.data_ptr() - start),
                        MADV_POPULATE_WRITE) == 0


def measure(nbytes: int, rounds: int) -> dict:
    out: dict = {}
    t = time.process_time()
    for _ in range(rounds):
        buf = _fresh(nbytes)
        buf.numpy()[:] = 1
        del buf
    out["fresh shared buffer, written once"] = 1e3 * (time.process_time() - t) / rounds
    t, ok = time.process_time(), True
    for _ in range(rounds):
        buf = _fresh(nbytes)
        ok &= _populate(buf)
        buf.numpy()[:] = 1
        del buf
    out["fresh, pages populated first (MADV_POPULATE_WRITE)" + ("" if ok else " [madvise refused]")] = (
        1e3 * (time.process_time() - t) / rounds)
    reused = _fresh(nbytes)
    reused.numpy()[:] = 0
    t = time.process_time()
    for _ in range(rounds):
        reused.numpy()[:] = 1
    out["one shared buffer reused, written again"] = 1e3 * (time.process_time() - t) / rounds
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=24.0, help="MB per batch")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/results/shm.json")
    args = ap.parse_args(argv)
    nbytes = int(args.mb * 2**20)
    ms = measure(nbytes, args.rounds)
    thp = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    result = {"benchmark": "fresh shared memory per loader batch", "mb": args.mb, "rounds": args.rounds,
              "cpu_ms_per_batch": ms, "platform": platform.platform(),
              "shmem_hugepages": thp.read_text().strip() if thp.exists() else None}
    print(f"CPU ms per batch of {args.mb:g} MB ({args.rounds} rounds):")
    for k, v in ms.items():
        print(f"  {k:<60} {v:7.2f}   ({v * 1024 / args.mb:.0f} ms per GiB)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
