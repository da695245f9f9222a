"""What checking tars against their manifest costs: sha256 of the bytes a reader reads anyway.

`integrity_cost(manifest)` reads every shard whole (`read_shard_records`, as extraction and the
stage-two loader do) `repeats` times with the check (the process forgets what it verified) and
without it (every tar already verified: the (size, mtime, inode) stamp is trusted), alternating,
and returns the minimum seconds per image of each. The difference is the hashing cost, paid the
first time a process reads a tar (extraction: once; stage two: in the first epoch, since workers
report what they verified to the main process and later epochs' workers inherit it).
"""
from __future__ import annotations

import time


def integrity_cost(manifest_path: str, repeats: int = 5) -> dict:
    import pipeline.data.reading as data
    from pipeline.data.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    images = manifest.total

    def read_all() -> float:
        t0 = time.perf_counter()
        for k in range(manifest.num_shards):
            data.read_shard_records(manifest, k)
        return time.perf_counter() - t0

    checked, trusted = [], []
    for _ in range(repeats):
        data._VERIFIED.clear()
        checked.append(read_all())  # hashes every tar
        trusted.append(read_all())  # stamps recorded: no hashing
    hashing = max(min(checked) - min(trusted), 0.0)
    return {"read_checked_s_per_image": min(checked) / images, "read_trusted_s_per_image": min(trusted) / images,
            "hash_s_per_image": hashing / images, "images": images}
