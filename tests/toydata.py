"""Tiny real datasets for tests: webdataset tars (`<key>.<ext>` + `<key>.json`) and their manifest."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.data.manifest import Manifest, ShardInfo, sha256_of, write_manifest

BROKEN_JPEG = b"\xff\xd8\xff\xe0 truncated" + bytes(40)  # a JPEG header and nothing decodable


def structured_jpeg(rng: np.random.Generator, sizes: tuple[int, int] = (72, 121)) -> bytes:
    """A JPEG with structure (gradients + blobs + noise) so that tokens differ, sides in [sizes)."""
    w, h = (int(v) for v in rng.integers(*sizes, size=2))
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w, yy / h, (np.sin(xx / rng.uniform(3, 9)) + 1) / 2], -1) * 200
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 25)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (1-bit gray) and whose pixel data is cut short:
    enough for every size check (made from the header, before decoding), without the pixels.
    20000 x 10000 = 200 Mpx is above Pillow's own limit (178956970) and costs a few bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


def write_dataset(folder: Path, payloads: Sequence[bytes], shard_size: int, ext: str = "jpg") -> str:
    """Tars of `shard_size` samples holding `payloads[i]` as image i, and their manifest; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(payloads)
    shards = []
    for k in range((n + shard_size - 1) // shard_size):
        url, first = f"toy-{k:06d}.tar", k * shard_size
        with tarfile.open(folder / url, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(first, min(n, first + shard_size)):
                meta = json.dumps({"index": index, "label": None, "name": f"img{index}.{ext}", "source": "test"})
                for member, body in ((ext, payloads[index]), ("json", meta.encode())):
                    info = tarfile.TarInfo(f"{index:09d}.{member}")
                    info.size, info.mtime = len(body), 0
                    tar.addfile(info, io.BytesIO(body))
        shards.append(ShardInfo(url, min(n, first + shard_size) - first, first, sha256_of(str(folder / url))))
    path = folder / "toy.json"
    write_manifest(Manifest(name="toy", shard_size=shard_size, total=n, shards=tuple(shards), class_map=None), path)
    return str(path)


def feed_one_process_both_ranks(monkeypatch, rank_batch: int = 4, ranks: int = 2) -> None:
    """Make a one-process distill with batch `ranks * rank_batch` see, at every step, the
    concatenation of what `ranks` DDP ranks of batch `rank_batch` would each load: the reference a
    multi-rank run's loss curve is compared with."""
    from dataclasses import replace

    import torch

    import pipeline.train.loader as loader_mod

    real_build, real_steps, real_run = loader_mod.build_loader, loader_mod.steps_per_epoch, loader_mod.RunLoader

    def joined(batches_of_ranks):
        for batches in zip(*batches_of_ranks):
            yield {k: torch.cat([b[k] for b in batches]) for k in batches[0]}

    def all_ranks(cfg, epoch, rank=0, world_size=1, skip_batches=0):
        part = replace(cfg, batch_size=cfg.batch_size // ranks)
        yield from joined([real_build(part, epoch, r, ranks, skip_batches) for r in range(ranks)])

    class AllRanks:  # what distill's epochs read (`pipeline.train.epochs` builds a RunLoader)
        def __init__(self, cfg, first_epoch, end_epoch, rank=0, world_size=1, skip_batches=0):
            part = replace(cfg, batch_size=cfg.batch_size // ranks)
            self.runs = [real_run(part, first_epoch, end_epoch, r, ranks, skip_batches) for r in range(ranks)]

        def epochs(self):
            for per_rank in zip(*[run.epochs() for run in self.runs]):
                yield per_rank[0][0], joined([batches for _, batches in per_rank])

    def steps(cfg, world_size):  # the loader calls it too, for the per-rank configs
        if cfg.batch_size == ranks * rank_batch:
            return real_steps(replace(cfg, batch_size=rank_batch), ranks)
        return real_steps(cfg, world_size)

    monkeypatch.setattr(loader_mod, "build_loader", all_ranks)
    monkeypatch.setattr(loader_mod, "RunLoader", AllRanks)
    monkeypatch.setattr(loader_mod, "steps_per_epoch", steps)
