"""Shards, manifests and stores on an S3 object store: moto's standalone server, started here on
127.0.0.1 with throw-away credentials, reached through s3fs exactly as a lab's bucket would be.

The chain on s3:// URLs equals the same chain on local paths: the same tars (sha256), the same store
files byte for byte, the same loss curve; inspect and verify read the URLs; every Zarr shard of a
store is one object; a SIGKILLed extraction to S3 resumes to the same bytes."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stores import chunk_files, free_port

pytestmark = pytest.mark.slow
MOTO = str(Path(sys.executable).parent / "moto_server")
KW = "{img_size: 32, patch_size: 8, depth: 3}"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback and the environment that points boto/s3fs at it."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "wb"),
                              stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    deadline = time.time() + 30
    while True:
        try:
            fs.mkdir("hdpipe")
            break
        except Exception:  # server still starting: connection refused
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    yield {"fs": fs, "env": {**os.environ}}
    server.kill()
    server.wait(timeout=30)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _tree(folder: Path, classes: int = 3, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            img = np.clip(rng.normal(60 + 60 * c, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
            (folder / f"c{c}" / f"{i}.jpg").write_bytes(buf.getvalue())
    return folder


def _chain(root: str, images: Path, runs: Path) -> dict:
    """shard -> extract (MIM, disc) -> distill -> evaluate with every data location under `root`."""
    from pipeline.data.manifest import read_manifest
    from stages.distill import DistillConfig, distill
    from stages.evaluate import EvaluateConfig, evaluate
    from stages.extract import ExtractConfig, extract
    from stages.shard import ShardConfig, shard

    manifest = str(shard(ShardConfig(input=str(images), name="toy", out_dir=f"{root}/shards", shard_size=8,
                                     manifest=f"{root}/manifests/toy.json", progress=False)))
    common = dict(manifest=manifest, random_init=True, model_kwargs={"img_size": 32, "patch_size": 8, "depth": 3},
                  targets=f"{root}/targets", batch_size=16, device="cpu", progress=False)
    mim = extract(ExtractConfig(teacher="timm:vit_tiny_patch16_224", role="mim", name="mim", views=2, **common))
    disc = extract(ExtractConfig(teacher="timm:deit_tiny_patch16_224", role="disc", name="disc",
                                 mim_store=mim, **common))
    run = distill(DistillConfig(manifest=manifest, mim_store=mim, disc_store=disc, model="vit_tiny_patch16_224",
                                model_kwargs={"img_size": 32, "patch_size": 8, "depth": 3}, epochs=2, batch_size=4,
                                workers=0, runs_dir=str(runs), name="s", checkpoint_every=0, device="cpu"))
    metrics = evaluate(EvaluateConfig(model=f"student:{run / 'student'}", train_manifest=manifest,
                                      test_manifest=manifest, k=5, out=str(runs / "eval.json"), device="cpu",
                                      progress=False))
    steps = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    return {"manifest": read_manifest(manifest), "mim": mim, "disc": disc, "metrics": metrics,
            "losses": [(r["step"], r["loss"], r["loss_features"], r["loss_relations"])
                       for r in steps if "event" not in r]}


def test_the_chain_on_s3_equals_the_chain_on_local_paths(s3, tmp_path, capsys):
    from stages.inspect_store import inspect_store
    from stages.verify import VerifyConfig, verify

    images = _tree(tmp_path / "images")
    local = _chain(str(tmp_path / "local"), images, tmp_path / "runs-local")
    remote = _chain("s3://hdpipe/chain", images, tmp_path / "runs-s3")
    assert remote["manifest"].digest() == local["manifest"].digest()  # the same tars, byte for byte
    assert remote["manifest"].shards[0].url.startswith("s3://hdpipe/chain/shards/")
    for name in ("mim", "disc"):
        assert chunk_files(remote[name]) == chunk_files(local[name]), name
    assert remote["losses"] == local["losses"]  # CPU: the same loss curve, exactly
    for key in ("knn", "linear"):
        assert remote["metrics"][key] == local["metrics"][key]
    # one object per Zarr shard of every stored array part (3 tar shards -> 3 objects each)
    fs = s3["fs"]
    for part in ("relations", "views", "keep_progressive", "valid"):
        objects = fs.find(f"hdpipe/chain/targets/mim.zarr/{part}/c")
        assert len(objects) == 3, (part, objects)
    info = inspect_store(remote["mim"])
    assert info["shards"] == {"total": 3, "done": 3, "missing": []} and info["bytes_per_view"] > 0
    report = verify(VerifyConfig(store=remote["disc"], samples=4, device="cpu"))
    assert report["ok"], report


def test_sigkilled_extraction_to_s3_resumes_to_the_same_bytes(s3, tmp_path):
    from stages.shard import ShardConfig, shard

    images = _tree(tmp_path / "images", classes=4, per_class=16)  # 64 images, 8 shards
    manifest = str(shard(ShardConfig(input=str(images), name="big", out_dir="s3://hdpipe/kill/shards", shard_size=8,
                                     manifest="s3://hdpipe/kill/big.json", progress=False)))
    args = [sys.executable, "-m", "pipeline.cli", "extract", "--manifest", manifest, "--teacher",
            "timm:vit_tiny_patch16_224", "--role", "mim", "--random-init", "--model-kwargs", KW, "--views", "3",
            "--batch-size", "4", "--device", "cpu", "--no-progress"]
    reference = subprocess.run(args + ["--out", "s3://hdpipe/kill/reference.zarr"], env=s3["env"],
                               capture_output=True, timeout=600)
    assert reference.returncode == 0, reference.stderr.decode()[-2000:]
    proc = subprocess.Popen(args + ["--out", "s3://hdpipe/kill/killed.zarr"], env=s3["env"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs = s3["fs"]
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if fs.exists("hdpipe/kill/killed.zarr/done/000000.json"):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the extraction finished before it could be killed"
    fs.invalidate_cache()
    done = fs.ls("hdpipe/kill/killed.zarr/done")
    assert 1 <= len(done) < 8
    resumed = subprocess.run(args + ["--out", "s3://hdpipe/kill/killed.zarr"], env=s3["env"], capture_output=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert f"{8 - len(done)} of 8 shards to do" in resumed.stderr.decode()
    assert chunk_files("s3://hdpipe/kill/killed.zarr") == chunk_files("s3://hdpipe/kill/reference.zarr")


def test_one_writer_and_damage_checks_on_s3(s3, tmp_path):
    """On an object store: a second extraction of a store is refused while the first holds its lock
    (created with s3fs's exclusive create); two racing lock takers get one winner; a deleted or
    truncated shard object is found by `inspect` (lengths against the done marker) and by a reader
    (a named ShardDamagedError), and a rerun of the same extraction rebuilds it to the same bytes."""
    import multiprocessing

    from pipeline.errors import LockError, ShardDamagedError
    from pipeline.locks import lock_path, writer_lock
    from pipeline.targets import integrity
    from pipeline.targets.store import TargetStore
    from stages.extract import ExtractConfig, extract
    from stages.shard import ShardConfig, shard

    images = _tree(tmp_path / "images", classes=2, per_class=8)
    manifest = str(shard(ShardConfig(input=str(images), name="one", out_dir="s3://hdpipe/one/shards", shard_size=8,
                                     manifest="s3://hdpipe/one/one.json", progress=False)))
    cfg = ExtractConfig(manifest=manifest, teacher="timm:vit_tiny_patch16_224", role="mim", random_init=True,
                        model_kwargs={"img_size": 32, "patch_size": 8, "depth": 3}, out="s3://hdpipe/one/mim.zarr",
                        views=1, batch_size=16, device="cpu", progress=False)
    url = extract(cfg)
    fs = s3["fs"]
    before = chunk_files(url)
    with writer_lock(url, "target store"):
        fs.invalidate_cache()
        assert fs.exists(lock_path(url).removeprefix("s3://"))
        with pytest.raises(LockError, match=f"pid {os.getpid()}"):
            extract(cfg)
    assert not fs.exists(lock_path(url).removeprefix("s3://"))
    # racing takers: exactly one holds the lock at a time
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        got = pool.starmap(_take_and_hold, [("s3://hdpipe/one/race.zarr", 1.5)] * 4)
    assert sorted(got).count("held") == 1, got
    # damage: one object deleted
    victim = next(p for p in fs.find("hdpipe/one/mim.zarr/relations/c"))
    fs.rm(victim)
    fs.invalidate_cache()
    store = TargetStore.open(url)
    assert set(integrity.damaged_shards(store)) == {1 if "/c/1/" in victim else 0}
    with pytest.raises(ShardDamagedError, match="is missing"):
        store.read_shard(int(victim.split("/c/")[1].split("/")[0]), ["relations"])
    extract(cfg)
    fs.invalidate_cache()
    assert chunk_files(url) == before


def _take_and_hold(url: str, seconds: float) -> str:
    from pipeline.errors import LockError
    from pipeline.locks import writer_lock

    try:
        with writer_lock(url, "target store"):
            time.sleep(seconds)
            return "held"
    except LockError:
        return "refused"


def test_later_epochs_fetch_only_the_shown_views_of_an_object(s3, tmp_path, monkeypatch):
    """A store on S3 with chunks per view: a shard object's first open fetches it whole (every chunk
    checked), later opens fetch its index and the shown views' chunks in ranged GETs, a third of the
    bytes at 3 views, with the same values as the local store's."""
    from pipeline import urls
    from pipeline.targets import schema, shard_reader
    from pipeline.targets.store import TargetStore
    from stages.extract import ExtractConfig, extract
    from stages.shard import ShardConfig, shard

    monkeypatch.setattr(schema, "VIEW_CHUNK_BYTES", 256)  # ViT-B rows are chunked per view; these tiny ones too
    monkeypatch.setattr(shard_reader, "RANGE_GAP", 0)  # a GET per chunk: the count says which were fetched
    images = _tree(tmp_path / "images", classes=2, per_class=8)
    manifest = str(shard(ShardConfig(input=str(images), name="r", out_dir=str(tmp_path / "shards"), shard_size=8,
                                     manifest=str(tmp_path / "r.json"), progress=False)))
    local = extract(ExtractConfig(manifest=manifest, teacher="timm:vit_tiny_patch16_224", role="mim",
                                  random_init=True, model_kwargs={"img_size": 32, "patch_size": 8, "depth": 3},
                                  out=str(tmp_path / "mim.zarr"), views=3, batch_size=16, device="cpu",
                                  progress=False))
    s3["fs"].put(local, "hdpipe/ranged/mim.zarr", recursive=True)
    remote = TargetStore.open("s3://hdpipe/ranged/mim.zarr")
    assert shard_reader.plan(remote._array("relations")).chunk[:2] == (1, 1)
    fetched: list[int] = []
    fs = urls.fs_and_path(remote.url)[0]  # the reader's filesystem object (s3fs mirrors its methods per instance)
    cat_ranges = fs.cat_ranges

    def counted(paths, starts, ends, *a, **k):
        fetched.extend(e - s for s, e in zip(starts, ends))
        return cat_ranges(paths, starts, ends, *a, **k)

    monkeypatch.setattr(fs, "cat_ranges", counted)
    count = remote.shard_rows(1)[1]
    for epoch in range(3):
        views = np.random.default_rng(epoch).integers(0, 3, count)
        got = remote.read_shard_views(1, ["relations"], views)["relations"]["q"]
        want = TargetStore.open(local).read_shard_views(1, ["relations"], views)["relations"]["q"]
        np.testing.assert_array_equal(got, want)
        if epoch == 0:
            assert not fetched  # whole, in one GET
    obj = next(p for p in s3["fs"].find("hdpipe/ranged/mim.zarr/relations/c") if "/c/1/" in p)
    assert len(fetched) == 2 * count  # epochs 1 and 2: one chunk per row
    assert sum(fetched) < 0.8 * s3["fs"].size(obj)
