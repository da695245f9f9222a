"""Reading shards: iter_shard and shard_dataset (node/worker splitting, no silent empty epochs)."""
from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.reading import iter_shard, shard_dataset
from pipeline.errors import ManifestError, ShardError
from pipeline.data.manifest import Manifest, read_manifest, write_manifest
from stages.shard import ShardConfig, shard

N_IMAGES = 22
SHARD_SIZE = 4  # -> 6 shards: 5 x 4 + 1 x 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A labeled tree of real JPEGs sharded into 6 tars; returns (manifest, {name: (label, bytes)})."""
    base = tmp_path_factory.mktemp("data")
    root = base / "train"
    want = {}
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        cls = f"c{i % 3}"
        small = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((24 + i, 20), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"img{i:02d}.jpg").write_bytes(buf.getvalue())
        want[f"{cls}/img{i:02d}.jpg"] = (int(cls[1]), buf.getvalue())
    path = shard(ShardConfig(input=str(root), name="d", out_dir=str(base / "shards"),
                             manifest=str(base / "d.json"), shard_size=SHARD_SIZE, shuffle=False, progress=False))
    return read_manifest(path), want


def test_iter_shard_whole_shard_in_index_order(data):
    m, want = data
    assert m.num_shards == 6
    names = sorted(want)
    for k in range(m.num_shards):
        recs = list(iter_shard(m, k))
        assert [r["index"] for r in recs] == list(range(k * SHARD_SIZE, min((k + 1) * SHARD_SIZE, N_IMAGES)))
        for r in recs:
            assert r["name"] == names[r["index"]]
            label, raw = want[r["name"]]
            assert r["label"] == label
            assert r["image"].mode == "RGB"
            # the decoded image equals an independent decode of the original file
            assert np.array_equal(np.asarray(r["image"]), np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    raw = [r["image"] for r in iter_shard(m, 5, decode=False)]
    assert raw == [want[names[i]][1] for i in (20, 21)]
    with pytest.raises(ManifestError, match="shard 6 outside"):
        list(iter_shard(m, 6))


def test_shard_dataset_yields_every_sample_once(data):
    m, want = data
    recs = list(shard_dataset(m))
    assert [r["index"] for r in recs] == list(range(N_IMAGES))  # one process: shards in order
    assert all(r["image"].mode == "RGB" for r in recs)
    assert [r["label"] for r in recs] == [want[r["name"]][0] for r in recs]
    sub = [r["index"] for r in shard_dataset(m, shard_ids=[4, 1], decode=False)]
    assert sub == [16, 17, 18, 19, 4, 5, 6, 7]
    shuffled = [r["index"] for r in shard_dataset(m, shuffle=8, seed=1, decode=False, shuffle_shards=True)]
    assert sorted(shuffled) == list(range(N_IMAGES)) and shuffled != list(range(N_IMAGES))
    again = [r["index"] for r in shard_dataset(m, shuffle=8, seed=1, decode=False, shuffle_shards=True)]
    assert again == shuffled  # seeded
    # webdataset's fluid interface is available (stage two batches with it)
    batches = list(shard_dataset(m, decode=False).map(lambda r: (r["index"], r["label"])).batched(5))
    assert [len(b[0]) for b in batches] == [5, 5, 5, 5, 2]
    assert np.concatenate([b[0] for b in batches]).tolist() == list(range(N_IMAGES))


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_node_split_covers_each_sample_exactly_once(data, monkeypatch, world):
    m, _ = data
    per_rank = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        per_rank.append([r["index"] for r in shard_dataset(m, decode=False)])
    flat = [i for idx in per_rank for i in idx]
    assert sorted(flat) == list(range(N_IMAGES))  # each exactly once
    # whole shards, round-robin: rank r holds shards r, r + world, ...
    for rank, idx in enumerate(per_rank):
        assert sorted({i // SHARD_SIZE for i in idx}) == list(range(rank, m.num_shards, world))


def test_dataloader_workers_and_ranks_cover_each_sample_once(data, monkeypatch):
    m, _ = data
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = torch.utils.data.DataLoader(shard_dataset(m, decode=False), batch_size=None, num_workers=2)
        got = [r["index"] for r in loader]
        # rank r has shards r, r+2, r+4; its two workers take alternate shards of those
        assert sorted(got) == sorted(i for k in range(rank, 6, 2) for i in m.shards[k].indices)
        seen += got
    assert sorted(seen) == list(range(N_IMAGES))


def test_batched_dataloader_with_decoded_images(data):
    m, _ = data
    ds = shard_dataset(m).map(lambda r: (torch.tensor(np.asarray(r["image"].resize((8, 8)))), r["index"], r["label"]))
    loader = torch.utils.data.DataLoader(ds.batched(4), batch_size=None, num_workers=2)
    idx = []
    for x, i, y in loader:
        assert x.shape[1:] == (8, 8, 3) and x.dtype == torch.uint8
        idx += list(i)
    assert sorted(idx) == list(range(N_IMAGES))


def test_too_many_ranks_is_an_error_not_an_empty_epoch(data, monkeypatch):
    m, _ = data
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "7")
    with pytest.raises(ShardError, match="rank 6 of world size 7 gets no shard: 6 shards"):
        list(shard_dataset(m, decode=False))
    # split=False reads everything regardless of the environment (single-process evaluation)
    assert len(list(shard_dataset(m, decode=False, split=False))) == N_IMAGES


def test_too_many_workers_is_an_error(data):
    m, _ = data
    loader = torch.utils.data.DataLoader(shard_dataset(m, shard_ids=[0], decode=False), batch_size=None, num_workers=2)
    with pytest.raises(ShardError, match="worker 1 of 2 .* 1 shard"):
        list(loader)


def test_missing_tar_is_named_when_the_dataset_is_built(data, tmp_path):
    m, _ = data
    # a copy of the manifest next to a copy of only some tars
    (tmp_path / "shards").mkdir()
    for k in (0, 2):
        os.link(m.shard_url(k), tmp_path / "shards" / f"d-{k:06d}.tar")
    doc = m.to_dict()
    for k, s in enumerate(doc["shards"]):
        s["url"] = f"shards/d-{k:06d}.tar"
    moved = write_manifest(Manifest(**{**m.__dict__, "shards": tuple(type(m.shards[0])(**s) for s in doc["shards"])}),
                           tmp_path / "moved.json")
    with pytest.raises(ManifestError, match=r"d-000001\.tar is missing"):
        shard_dataset(moved)
    assert [r["index"] for r in shard_dataset(moved, shard_ids=[2], decode=False)] == [8, 9, 10, 11]
    with pytest.raises(ManifestError, match=r"d-000001\.tar is missing"):
        list(iter_shard(moved, 1))


def test_tar_that_does_not_match_its_manifest(data, tmp_path):
    m, _ = data
    # shard 1's URL pointing at shard 0's tar: the stored indices disagree with the manifest
    shards = list(m.shards)
    shards[1] = type(shards[1])(url=m.shard_url(0), count=4, first_index=4, sha256=shards[0].sha256)
    wrong = Manifest(**{**m.__dict__, "shards": tuple(shards)})
    with pytest.raises(ManifestError, match="says index 0 but the manifest puts it at 4"):
        list(iter_shard(wrong, 1))
    # the last shard (2 samples) claimed to hold 3... would break validation, so count within memory
    shards = list(m.shards)
    shards[5] = type(shards[5])(url=m.shard_url(5), count=1, first_index=20, sha256=shards[5].sha256)
    short = Manifest(**{**m.__dict__, "shards": tuple(shards), "total": 21})
    with pytest.raises(ManifestError, match="more than the 1 samples"):
        list(iter_shard(short, 5, decode=False))


def test_truncated_tar_names_it(data, tmp_path):
    m, _ = data
    blob = open(m.shard_url(2), "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(blob[: len(blob) // 2])
    shards = list(m.shards)
    shards[2] = type(shards[2])(url=str(cut), count=4, first_index=8, sha256=shards[2].sha256)
    broken = Manifest(**{**m.__dict__, "shards": tuple(shards)})
    with pytest.raises(ShardError, match="cut.tar: truncated or corrupt tar"):
        list(iter_shard(broken, 2, decode=False))


def test_plain_webdataset_reads_our_tars(data):
    """Interop: webdataset's own WebDataset + decode("pil") sees our keys, labels and metadata."""
    import warnings

    import webdataset as wds

    m, want = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = wds.WebDataset(m.shard_urls(), shardshuffle=False, nodesplitter=None).decode("pil")
        samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(N_IMAGES)]
    for s in samples:
        assert s["cls"] == want[s["json"]["name"]][0] == s["json"]["label"]
        assert s["json"]["index"] == int(s["__key__"])


def test_sha256_is_checked_once_per_process_while_reading(data, tmp_path, monkeypatch):
    """The first read hashes the tar (from the bytes it reads anyway); later reads trust its
    (size, mtime, inode) stamp; a changed stamp hashes again, and a changed byte is an
    IntegrityError naming the tar and both hashes."""
    import hashlib
    import shutil

    import pipeline.data.reading
    from pipeline.data.reading import read_shard_records
    from pipeline.errors import IntegrityError

    m, _ = data
    shutil.copytree(os.path.dirname(m.shard_url(0)), tmp_path / "tars")
    shards = tuple(type(s)(url=str(tmp_path / "tars" / os.path.basename(s.url)), count=s.count,
                           first_index=s.first_index, sha256=s.sha256) for s in m.shards)
    local = Manifest(**{**m.__dict__, "shards": shards})
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(pipeline.data.reading.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    first = read_shard_records(local, 1)
    assert len(calls) == 1
    assert read_shard_records(local, 1) == first and len(calls) == 1  # stamp unchanged: trusted
    url = local.shard_url(1)
    os.utime(url, ns=(1, 1))  # same bytes, other mtime: hashed again, still fine
    assert read_shard_records(local, 1) == first and len(calls) == 2
    blob = bytearray(open(url, "rb").read())
    blob[700] ^= 0xFF  # one byte inside the first image: same size, same member layout
    open(url, "wb").write(bytes(blob))
    got = hashlib.sha256(bytes(blob)).hexdigest()
    with pytest.raises(IntegrityError) as err:
        read_shard_records(local, 1)
    msg = str(err.value)
    assert url in msg and got in msg and m.shards[1].sha256 in msg and "shard 1 of manifest" in msg
    assert "hdpipe shard --input" in msg and "--overwrite" in msg  # the recorded command, re-run


@pytest.mark.parametrize("member", ["../escape.jpg", "/abs/x.jpg", "a/../../x.jpg"])
def test_tar_member_outside_the_dataset_is_refused(tmp_path, member):
    import tarfile

    from pipeline.data.reading import tar_samples

    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(member)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with open(path, "rb") as f, pytest.raises(ShardError, match=rf"evil.tar: member '{re.escape(member)}' has an absolute"):
        list(tar_samples(f, str(path)))


def test_decode_image_applies_exif_orientation():
    from PIL import ImageOps

    from pipeline.data.images import decode_image

    im = Image.fromarray(np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif.tobytes())
    got = decode_image(buf.getvalue())
    want = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")
    assert got.size == (6, 10) and np.array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ShardError, match=r"img7 does not decode \("):
        decode_image(b"\x89PNG\r\n\x1a\n broken", "img7")
