"""What checking tars against their manifest costs: sha256 of the bytes a reader reads anyway.

`integrity_cost(manifest)` reads every shard whole (`read_shard_records`, as extraction and the
stage-two loader do) `repeats` times with the check (the process forgets what it verified) and
without it (every tar already verified: the (size, mtime, inode) stamp is trusted), alternating,
and returns the minimum seconds per image of each. The difference is the hashing cost, paid the
first time a process reads a tar (extraction: once; stage two: once per loader worker, which lives
for the whole run).
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


def store_check_cost(store_url: str, repeats: int = 5) -> dict:
    """What checking a target store costs a reader, per stored view, in CPU seconds.

    Two checks run on every shard a reader opens (`pipeline.targets.integrity`): the done marker's
    file lengths against a stat of each file (`lengths`), and Zarr's crc32c of every chunk it
    decodes (`crc32c`: timed here over the bytes of every shard file, which is what the codec sums
    when a reader reads every row, as the loader and extraction do). Both are inside the loader's
    and extraction's own timings already; this is their share. Minimum over `repeats`.
    """
    import google_crc32c

    from pipeline.targets import integrity
    from pipeline.targets.store import TargetStore

    store = TargetStore.open(store_url)
    done = sorted(store.done_shards())
    views = sum(store.shard_rows(k)[1] for k in done) * store.views
    files = {k: integrity.shard_files(store, k, store.arrays) for k in done}
    blobs = [store.fs.cat_file(f"{store.path}/{key}") for k in done for key in files[k]]
    lengths, crcs = [], []
    for _ in range(repeats):
        t0 = time.process_time()
        for k in done:
            integrity.verified_marker(store, k, store.arrays)
        lengths.append(time.process_time() - t0)
        t0 = time.process_time()
        for blob in blobs:
            google_crc32c.value(blob)
        crcs.append(time.process_time() - t0)
    return {"lengths_s_per_view": min(lengths) / views, "crc32c_s_per_view": min(crcs) / views,
            "check_s_per_view": (min(lengths) + min(crcs)) / views,
            "stored_bytes_per_view": sum(map(len, blobs)) / views, "views": views}
