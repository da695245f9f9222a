"""Reading shards: whole shards in index order, their sha256 checked while read; bad tars named."""
from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.data.reading import iter_shard
from pipeline.errors import ManifestError, ShardError
from pipeline.data.manifest import Manifest, read_manifest, verify_shards, write_manifest
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


def test_missing_tar_is_named(data, tmp_path):
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
        verify_shards(moved, check_hashes=False)
    assert [r["index"] for r in iter_shard(moved, 2, decode=False)] == [8, 9, 10, 11]
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
    with open(path, "rb") as f, pytest.raises(ShardError,
                                              match=rf"evil.tar: member '{re.escape(member)}' has an absolute"):
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


@pytest.mark.parametrize("max_pixels, refused", [(None, True), (199_999_999, True), (200_000_000, False),
                                                 (400_000_000, False)])
def test_decode_image_holds_the_header_to_the_limit_it_is_given(max_pixels, refused):
    """20000x10000 = 200 Mpx (header only): refused from the header above the limit (hdpipe's default when
    none is given), citing it and the option; at or under it only the cut pixel data fails."""
    from pipeline.data.images import decode_image
    from toydata import bomb_png

    kw = {} if max_pixels is None else {"max_pixels": max_pixels}
    with pytest.raises(ShardError) as e:
        decode_image(bomb_png(20_000, 10_000), "big.png", **kw)
    limit = 178_956_970 if max_pixels is None else max_pixels
    if refused:
        assert str(e.value) == (f"big.png does not decode: 20000x10000 = 200000000 pixels exceeds max_image_pixels="
                                f"{limit}, the limit its dataset was sharded with (decompression-bomb guard; if the "
                                "image is genuine, re-shard with a larger --max-image-pixels)")
    else:
        assert str(e.value).startswith("big.png does not decode (OSError: image file is truncated"), str(e.value)


def test_each_decode_holds_its_own_limit_across_threads():
    """The limit travels with each call (not a process setting): threads decoding with a raised and with
    the default limit at once each get their own answer, and Pillow's own limit is left as it was."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.images import decode_image
    from toydata import bomb_png

    data, before = bomb_png(20_000, 10_000), Image.MAX_IMAGE_PIXELS

    def reason(max_pixels: int) -> str:
        try:
            decode_image(data, max_pixels=max_pixels)
        except ShardError as e:
            return "bomb" if "exceeds max_image_pixels" in str(e) else "cut" if "truncated" in str(e) else str(e)
        return "decoded"

    limits = [400_000_000, 178_956_970] * 16
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(reason, limits))
    assert got == ["cut", "bomb"] * 16 and Image.MAX_IMAGE_PIXELS == before


def test_views_of_an_image_above_pillows_limit_render(monkeypatch):
    """Pillow also refuses crops above its own limit; a view of an image the dataset's limit admitted
    renders anyway (shown with the limits scaled down: a 1280-pixel image above a 100-pixel limit)."""
    import pipeline.data.images as images
    from pipeline.data.views import View, render_pil

    monkeypatch.setattr(images, "DEFAULT_MAX_PIXELS", 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow refuses crops above 2 x 50
    image = Image.fromarray(np.arange(32 * 40 * 3, dtype=np.uint8).reshape(32, 40, 3))
    with pytest.raises(Image.DecompressionBombError):
        image.crop((0, 0, 40, 31))  # 1240 pixels (a crop of the whole image is a copy, never checked)
    out = render_pil(image, View(box=(0.0, 0.0, 1.0, 31 / 32), flip=False), 16)
    assert out.size == (16, 16) and Image.MAX_IMAGE_PIXELS == 50
