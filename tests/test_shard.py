"""`stages.shard`: folders, existing tars and the bundled sample -> tars + manifests, and every bad input."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import DEFAULT_MAX_PIXELS, decode_image
from pipeline.data.reading import iter_shard, read_shard_records
from pipeline.errors import ConfigError, ManifestError, ShardError
from pipeline.data.manifest import read_manifest, verify_shards
from pipeline.data.tars import TarShardWriter, key_of
from stages.shard import ShardConfig, shard
from toydata import bomb_png, write_dataset


def _photo(seed: int, size=(40, 32)) -> Image.Image:
    """A small smooth random RGB image (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _save(im: Image.Image, path, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _cfg(**kw) -> ShardConfig:
    return ShardConfig(progress=False, **kw)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def tree(tmp_path):
    """ImageNet-style tree: 3 classes x 3 images (JPEG, a PNG, a BMP), {relative name: (label, bytes)}."""
    root = tmp_path / "train"
    want = {}
    for c, wnid in enumerate(["n02", "n01", "n03"]):  # not in sorted order on purpose
        for i in range(3):
            name = f"{wnid}/{wnid}_{i}.JPEG"
            want[name] = _save(_photo(10 * c + i), root / name, "JPEG", quality=90)
    want["n01/extra.png"] = _save(_photo(99), root / "n01" / "extra.png", "PNG")
    bmp = _photo(98)
    _save(bmp, root / "n03" / "sub" / "deep.bmp", "BMP")
    want["n03/sub/deep.bmp"] = np.asarray(bmp)
    return root, want


def test_tree_round_trip_every_sample(tree, tmp_path):
    root, want = tree
    mpath = shard(_cfg(input=str(root), name="toy", out_dir=str(tmp_path / "out"),
                       manifest=str(tmp_path / "m" / "toy.json"), shard_size=4, shuffle=False))
    m = read_manifest(mpath)
    assert m.class_map == {"n01": 0, "n02": 1, "n03": 2}  # sorted folder names
    assert (m.total, m.num_shards, [s.count for s in m.shards]) == (11, 3, [4, 4, 3])
    assert [s.first_index for s in m.shards] == [0, 4, 8]
    assert m.shards[0].url == "../out/toy/toy-000000.tar"  # relative to the manifest's folder
    verify_shards(m)
    seen = []
    for k in range(m.num_shards):
        for rec in iter_shard(m, k, decode=False):
            seen.append(rec)
    assert [r["index"] for r in seen] == list(range(11))
    # sorted relative paths define the order
    assert [r["name"] for r in seen] == sorted(want)
    for r in seen:
        label = m.class_map[r["name"].split("/")[0]]
        assert r["label"] == label
        expected = want[r["name"]]
        if isinstance(expected, bytes):  # JPEG and PNG: stored byte for byte
            assert r["image"] == expected
        else:  # BMP: lossless PNG re-encode, same pixels
            assert r["image"][:8] == b"\x89PNG\r\n\x1a\n"
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")), expected)
    # tar layout: <key>.cls/.jpg/.json members with fixed headers, keys = 9-digit indices
    with tarfile.open(m.shard_url(0)) as t:
        members = t.getmembers()
        assert [x.name for x in members[:6]] == ["000000000.cls", "000000000.json", "000000000.png",
                                                 "000000001.cls", "000000001.jpg", "000000001.json"]
        assert {(x.mtime, x.uid, x.gid, x.uname, x.mode) for x in members} == {(946684800, 0, 0, "", 0o444)}
        meta = json.loads(t.extractfile("000000001.json").read())
    assert meta == {"index": 1, "label": 0, "name": "n01/n01_0.JPEG", "source": "train"}
    assert not [p for p in os.listdir(tmp_path / "out" / "toy") if p.endswith(".tmp")]
    assert "hdpipe shard --input" in m.command and "--shard-size 4" in m.command and "--no-shuffle" in m.command


def test_same_input_twice_gives_identical_tars(tree, tmp_path):
    root, _ = tree
    a = read_manifest(shard(_cfg(input=str(root), name="d", out_dir=str(tmp_path / "a"),
                                 manifest=str(tmp_path / "a.json"), shard_size=4)))
    b = read_manifest(shard(_cfg(input=str(root), name="d", out_dir=str(tmp_path / "b"),
                                 manifest=str(tmp_path / "b.json"), shard_size=4, workers=2)))
    hashes_a = [_sha(a.shard_url(k)) for k in range(a.num_shards)]
    assert hashes_a == [_sha(b.shard_url(k)) for k in range(b.num_shards)]
    assert hashes_a == [s.sha256 for s in a.shards]  # the manifest records the true file hash
    assert a.digest() == b.digest()


def test_seeded_shuffle(tree, tmp_path):
    root, want = tree

    def names(seed, tag):
        m = read_manifest(shard(_cfg(input=str(root), name=tag, out_dir=str(tmp_path / tag),
                                     manifest=str(tmp_path / f"{tag}.json"), shuffle=True, seed=seed)))
        return [r["name"] for r in iter_shard(m, 0, decode=False)], m

    assert ShardConfig(input="x").shuffle  # the default: class folders must not become one-class tars
    first, m = names(3, "s1")
    again, _ = names(3, "s2")
    other, _ = names(4, "s3")
    files = sorted(want)
    assert first == again and sorted(first) == files
    assert first == [files[i] for i in np.random.default_rng(3).permutation(len(files))]
    assert other != first
    assert "shuffled seed 3" in m.source


def test_flat_folder_is_unlabeled_and_jpeg_reencode(tmp_path):
    folder = tmp_path / "flat"
    jpg = _save(_photo(1), folder / "a.jpg", "JPEG", quality=80)
    png_src = _photo(2)
    _save(png_src, folder / "b.png", "PNG")
    (folder / ".DS_Store").write_bytes(b"junk")  # hidden files are not inputs
    m = read_manifest(shard(_cfg(input=str(folder), out_dir=str(tmp_path / "o"), manifest=str(tmp_path / "f.json"),
                                 reencode="jpeg", jpeg_quality=70)))
    assert m.name == "flat" and m.class_map is None and m.total == 2
    a, b = list(iter_shard(m, 0, decode=False))
    assert (a["label"], b["label"]) == (-1, -1)
    assert a["image"] == jpg
    expected = io.BytesIO()
    png_src.save(expected, format="JPEG", quality=70)
    assert b["image"] == expected.getvalue()
    with tarfile.open(m.shard_url(0)) as t:
        assert [x.name for x in t.getmembers()] == ["000000000.jpg", "000000000.json",
                                                    "000000001.jpg", "000000001.json"]


def _broken_files(folder):
    """name -> (writer, message fragment) for each kind of bad input."""
    good = io.BytesIO()
    _photo(5).save(good, format="JPEG")
    return {
        "corrupt.jpg": (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), "not an image|corrupt"),
        "truncated.jpg": (lambda p: p.write_bytes(good.getvalue()[: len(good.getvalue()) // 2]), "truncated"),
        "notes.txt": (lambda p: p.write_text("hello, not an image"), "not an image"),
        "empty.jpg": (lambda p: p.write_bytes(b""), "empty file"),
        "dangling.jpg": (lambda p: os.symlink(folder / "gone.jpg", p), "cannot read"),
    }


@pytest.mark.parametrize("bad", list(_broken_files("/")))
def test_bad_input_file_fails_naming_it(tmp_path, bad):
    folder = tmp_path / "in"
    _save(_photo(0), folder / "a_good.jpg", "JPEG")
    writer, fragment = _broken_files(folder)[bad]
    writer(folder / bad)
    out = tmp_path / "out"
    with pytest.raises(ShardError, match=fragment) as e:
        shard(_cfg(input=str(folder), out_dir=str(out), manifest=str(tmp_path / "m.json")))
    assert bad in str(e.value) and "--on-error skip" in str(e.value)
    # nothing of the run is left: no manifest, no tar, no empty output folder
    assert not (tmp_path / "m.json").exists()
    assert not out.exists() or not any(out.rglob("*"))
    assert not (out / "in").exists()


def test_on_error_fail_lists_every_bad_file_and_keeps_the_old_dataset(tmp_path):
    """Three bad files spread over several shards are all named in one error; tars already written
    by the failed run are removed, and an --overwrite run that fails leaves the old tars intact."""
    folder = tmp_path / "in"
    for i in range(9):
        _save(_photo(i), folder / f"img{i}.jpg", "JPEG")
    out, manifest = tmp_path / "out", str(tmp_path / "m.json")
    first = read_manifest(shard(_cfg(input=str(folder), out_dir=str(out), manifest=manifest, shard_size=2)))
    before = {p.name: p.read_bytes() for p in (out / "in").iterdir()}
    for name in ("img2.jpg", "img5.jpg", "img8.jpg"):
        (folder / name).write_text("not an image")
    with pytest.raises(ShardError, match="3 bad input file") as e:
        shard(_cfg(input=str(folder), out_dir=str(out), manifest=manifest, shard_size=2, overwrite=True))
    for name in ("img2.jpg", "img5.jpg", "img8.jpg"):
        assert name in str(e.value)
    assert {p.name: p.read_bytes() for p in (out / "in").iterdir()} == before  # nothing replaced or left over
    verify_shards(read_manifest(manifest))  # the old manifest still describes its tars
    assert read_manifest(manifest) == first


def _run_as_nobody(fn) -> str:
    """Run `fn()` in a forked child that, when we are root, first drops to uid `nobody` (root reads
    every file whatever its permission bits). Returns the child's ShardError message, or "" on success."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(r)
        code = 0
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            fn()
        except ShardError as e:
            os.write(w, str(e).encode())
        except BaseException as e:  # report anything else as a failure too
            os.write(w, f"UNEXPECTED {type(e).__name__}: {e}".encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        msg = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, msg
    return msg


def test_permission_denied_file():
    import shutil
    import tempfile
    from pathlib import Path

    work = Path(tempfile.mkdtemp(prefix="hdpipe-perm-", dir="/tmp"))  # /tmp: reachable for `nobody`
    try:
        os.chmod(work, 0o777)
        folder = work / "in"
        for n in ("a.jpg", "locked.jpg"):
            _save(_photo(0), folder / n, "JPEG")
        os.chmod(folder, 0o755)
        os.chmod(folder / "a.jpg", 0o644)
        os.chmod(folder / "locked.jpg", 0)
        kw = dict(input=str(folder), out_dir=str(work / "o"), manifest=str(work / "m.json"))
        msg = _run_as_nobody(lambda: shard(_cfg(**kw)))
        assert "locked.jpg: cannot read the file (permission denied)" in msg
        assert _run_as_nobody(lambda: shard(_cfg(**kw, on_error="skip"))) == ""
        m = read_manifest(work / "m.json")
        assert m.total == 1 and [s["name"] for s in m.skipped] == ["locked.jpg"]
    finally:
        shutil.rmtree(work)


def test_on_error_skip_reconciles_counts(tmp_path):
    folder = tmp_path / "in"
    for i in range(5):
        _save(_photo(i), folder / f"img{i}.jpg", "JPEG")
    broken = _broken_files(folder)
    for name, (writer, _) in broken.items():
        writer(folder / name)
    n_inputs = 5 + len(broken)
    m = read_manifest(shard(_cfg(input=str(folder), out_dir=str(tmp_path / "o"), manifest=str(tmp_path / "m.json"),
                                 on_error="skip", shard_size=2)))
    assert m.total == 5 and m.total + len(m.skipped) == n_inputs
    assert sorted(s["name"] for s in m.skipped) == sorted(broken)
    for s in m.skipped:
        assert re.search(broken[s["name"]][1], s["reason"]), s
    names = [r["name"] for k in range(m.num_shards) for r in iter_shard(m, k, decode=False)]
    assert sorted(names) == [f"img{i}.jpg" for i in range(5)]
    assert [s.count for s in m.shards] == [2, 2, 1]


def test_decompression_bomb_guard(tmp_path):
    folder = tmp_path / "in"
    _save(_photo(0, size=(60, 50)), folder / "big.png", "PNG")
    with pytest.raises(ShardError, match="max_image_pixels=1000") as e:
        shard(_cfg(input=str(folder), out_dir=str(tmp_path / "o"), manifest=str(tmp_path / "m.json"),
                   max_image_pixels=1000))
    assert "big.png" in str(e.value) and "3000 pixels" in str(e.value)


@pytest.mark.parametrize("limit, refused", [(10_000, True), (14_400, False), (20_000, False)])
def test_max_image_pixels_refuses_above_and_accepts_up_to_the_limit(tmp_path, limit, refused):
    folder = tmp_path / "in"
    _save(_photo(0, size=(120, 120)), folder / "big.png", "PNG")  # 14,400 pixels
    cfg = _cfg(input=str(folder), out_dir=str(tmp_path / "o"), manifest=str(tmp_path / "m.json"),
               max_image_pixels=limit)
    if refused:
        with pytest.raises(ShardError, match=r"big\.png: 120x120 = 14400 pixels exceeds max_image_pixels=10000 "
                                             r"\(decompression-bomb guard; raise --max-image-pixels"):
            shard(cfg)
    else:
        assert read_manifest(shard(cfg)).total == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_max_image_pixels_above_pillows_own_limit_is_honoured(tmp_path, workers):
    """20000x10000 = 200 Mpx: above Pillow's default (it refuses 178956970+), below the user's 400 Mpx.
    The header passes every size check, in worker processes too; what is left is the cut pixel data."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "huge.png").write_bytes(bomb_png(20_000, 10_000))
    _save(_photo(1), folder / "small.png", "PNG")
    common = dict(input=str(folder), out_dir=str(tmp_path / "o"), on_error="skip", workers=workers, shuffle=False)
    m = read_manifest(shard(_cfg(**common, manifest=str(tmp_path / "big.json"), max_image_pixels=400_000_000)))
    [skipped] = m.skipped
    assert skipped["name"] == "huge.png" and "corrupt or truncated image" in skipped["reason"], skipped
    assert "178956970" not in skipped["reason"] and m.total == 1
    assert m.max_image_pixels == 400_000_000  # recorded for the stages that decode the dataset later
    # The default limit refuses it by the same header, citing hdpipe's limit and option, not Pillow's.
    m = read_manifest(shard(_cfg(**common, name="default", manifest=str(tmp_path / "default.json"))))
    assert m.skipped[0]["reason"].endswith("20000x10000 = 200000000 pixels exceeds max_image_pixels=178956970 "
                                           "(decompression-bomb guard; raise --max-image-pixels if the image is "
                                           "genuine)"), m.skipped
    assert m.max_image_pixels == DEFAULT_MAX_PIXELS
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # left as it was for the rest of the process


def test_readers_decode_with_the_pixel_limit_the_manifest_records(tmp_path):
    """A 200 Mpx image in a dataset sharded with --max-image-pixels 400000000 gets past the bomb check
    of every reader of that manifest (what fails is then only its cut pixel data); the same tar indexed
    with the default limit is refused citing hdpipe's limit and option, not Pillow's."""
    from pipeline.eval.finetune import _train_view
    from pipeline.eval.subjects import iter_images

    buf = io.BytesIO()
    _photo(0).save(buf, format="PNG")
    write_dataset(tmp_path / "tars", [buf.getvalue(), bomb_png(20_000, 10_000)], shard_size=2, ext="png")
    common = dict(urls=str(tmp_path / "tars" / "toy-000000.tar"), name="huge")
    raised = read_manifest(shard(_cfg(**common, manifest=str(tmp_path / "raised.json"), max_image_pixels=400_000_000)))
    default = read_manifest(shard(_cfg(**common, manifest=str(tmp_path / "default.json"))))
    assert raised.max_image_pixels == 400_000_000 and "--max-image-pixels 400000000" in raised.command
    assert default.max_image_pixels == DEFAULT_MAX_PIXELS and raised.digest() == default.digest()
    assert json.loads((tmp_path / "raised.json").read_text())["max_image_pixels"] == 400_000_000
    cut = r"does not decode \(OSError: image file is truncated"
    refused = (r"does not decode: 20000x10000 = 200000000 pixels exceeds max_image_pixels=178956970, the limit its "
               r"dataset was sharded with \(decompression-bomb guard; if the image is genuine, re-shard with a "
               r"larger --max-image-pixels\)$")
    for m, want in ((raised, cut), (default, refused)):
        with pytest.raises(ShardError) as e:  # iter_shard decodes with the manifest's limit
            list(iter_shard(m, 0))
        assert re.search(r"toy-000000\.tar: sample 000000001 \(img1\.png\) " + want, str(e.value)), str(e.value)
        [good, huge] = read_shard_records(m, 0)  # the bytes, as extract, distill, verify, evaluate read them
        assert decode_image(good["image"], max_pixels=m.max_image_pixels).size == (40, 32)
        with pytest.raises(ShardError) as e:
            decode_image(huge["image"], "img1", max_pixels=m.max_image_pixels)
        assert re.match("img1 " + want, str(e.value)), str(e.value)
        with pytest.raises(ShardError) as e:  # evaluate/analyze and fine-tune's test split
            list(iter_images(str(m.path), progress=False))
        assert re.match(r"image 000000001 \(img1\.png\) of .*\.json " + want, str(e.value)), str(e.value)
        with pytest.raises(ShardError) as e:  # fine-tune's training views
            _train_view(lambda image: image, huge["image"], m.max_image_pixels)
        assert re.match("image " + want, str(e.value)), str(e.value)
        if m is raised:
            assert "178956970" not in str(e.value) and "DecompressionBomb" not in str(e.value)


@pytest.mark.parametrize("layout,fragment", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("empty_classes", "hold no image files"),
    ("file", "is not a folder"),
    ("mixed", "mixes files"),
    ("splits", "give one split"),
])
def test_bad_input_folder(tmp_path, layout, fragment):
    root = tmp_path / "in"
    if layout == "empty":
        root.mkdir()
    elif layout == "empty_classes":
        (root / "n01").mkdir(parents=True)
    elif layout == "file":
        root.write_text("x")
    elif layout == "mixed":
        _save(_photo(0), root / "a.jpg", "JPEG")
        _save(_photo(1), root / "cls" / "b.jpg", "JPEG")
    elif layout == "splits":
        _save(_photo(0), root / "train" / "n01" / "a.jpg", "JPEG")
        _save(_photo(1), root / "val" / "n01" / "b.jpg", "JPEG")
    with pytest.raises(ShardError, match=fragment) as e:
        shard(_cfg(input=str(root), name="x", out_dir=str(tmp_path / "o"), manifest=str(tmp_path / "m.json")))
    assert str(root) in str(e.value)


def test_existing_output_refused_then_overwrite(tree, tmp_path):
    root, _ = tree
    kw = dict(input=str(root), name="d", out_dir=str(tmp_path / "o"), manifest=str(tmp_path / "d.json"))
    m = read_manifest(shard(_cfg(shard_size=2, **kw)))
    assert m.num_shards == 6
    before = (tmp_path / "d.json").read_bytes()
    with pytest.raises(ShardError, match="already exists") as e:
        shard(_cfg(shard_size=4, **kw))
    assert "d-000000.tar" in str(e.value) and "--overwrite" in str(e.value)
    assert (tmp_path / "d.json").read_bytes() == before
    # only the manifest left over: still refused, naming it
    for k in range(6):
        os.remove(m.shard_url(k))
    with pytest.raises(ShardError, match="manifest .*d.json already exists"):
        shard(_cfg(shard_size=4, **kw))
    shard(_cfg(shard_size=2, **kw, overwrite=True))
    m2 = read_manifest(shard(_cfg(shard_size=4, **kw, overwrite=True)))
    assert m2.num_shards == 3
    # stale shards of the previous, larger layout are removed
    assert sorted(os.listdir(tmp_path / "o" / "d")) == [f"d-{k:06d}.tar" for k in range(3)]
    verify_shards(m2)


def test_writer_refuses_existing_tar_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "x-000000.tar"
    target.write_bytes(b"old")
    with pytest.raises(ShardError, match=str(target)):
        TarShardWriter(str(target))
    with pytest.raises(RuntimeError):
        with TarShardWriter(str(tmp_path / "y-000000.tar")) as w:
            w.add(key_of(0), {"jpg": b"abc"})
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["x-000000.tar"]


def test_config_validation():
    with pytest.raises(ConfigError, match="exactly one of"):
        shard(_cfg())
    with pytest.raises(ConfigError, match="exactly one of"):
        shard(_cfg(input="a", sample=True))
    with pytest.raises(ConfigError, match="jpeg_quality"):
        shard(_cfg(input="a", jpeg_quality=100))
    with pytest.raises(ConfigError, match="name"):
        shard(_cfg(input="a", name="a/b"))


# ---- indexing existing tars ------------------------------------------------------------------


def _foreign_tars(folder, counts):
    """Tars written by another tool (webdataset's TarWriter) with its own keys and labels."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    payloads = []
    for k, n in enumerate(counts):
        with wds.TarWriter(str(folder / f"x-{k:06d}.tar")) as w:
            for i in range(n):
                buf = io.BytesIO()
                _photo(100 * k + i).save(buf, format="JPEG")
                payloads.append(buf.getvalue())
                w.write({"__key__": f"img_{k}_{i}", "jpg": buf.getvalue(), "cls": str(i % 2)})
    return payloads


def test_index_existing_tars_by_pattern_and_list(tmp_path):
    payloads = _foreign_tars(tmp_path / "tars", [3, 3, 2])
    pattern = str(tmp_path / "tars" / "x-{000000..000002}.tar")
    m = read_manifest(shard(_cfg(urls=pattern, manifest=str(tmp_path / "x.json"))))
    assert (m.name, m.shard_size, m.total, [s.first_index for s in m.shards]) == ("x", 3, 8, [0, 3, 6])
    assert m.shards[2].url == "tars/x-000002.tar"
    verify_shards(m)
    recs = [r for k in range(3) for r in iter_shard(m, k, decode=False)]
    assert [r["index"] for r in recs] == list(range(8))  # by position
    assert [r["image"] for r in recs] == payloads
    assert [r["label"] for r in recs] == [0, 1, 0, 0, 1, 0, 0, 1]
    assert recs[4]["name"] == "img_1_1"  # no .json: the original key is the name
    # the same tars listed in a file (relative to the current folder) give the same manifest content
    listing = tmp_path / "list.txt"
    listing.write_text("# my tars\n" + "".join(f"tars/x-{k:06d}.tar\n" for k in range(3)))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        m2 = read_manifest(shard(_cfg(urls="list.txt", name="x2", manifest="x2.json")))
    finally:
        os.chdir(cwd)
    assert m2.digest() == m.digest()


def test_index_imagenet_webdataset_release_reads_labels_and_class_map(tmp_path):
    """The ImageNet webdataset layout (keys n01440764_10026, members .jpg/.cls/.json with the
    original filename): labels and the class map come from the tars, so `evaluate` accepts them."""
    import webdataset as wds

    wnids = ["n01440764", "n01443537", "n01484850"]
    (tmp_path / "tars").mkdir()
    want = []
    for k in range(2):
        with wds.TarWriter(str(tmp_path / "tars" / f"imagenet-val-{k:04d}.tar")) as w:
            for i in range(4):
                label = (2 * k + i) % 3
                key = f"{wnids[label]}_{100 * k + i}"
                buf = io.BytesIO()
                _photo(k * 10 + i).save(buf, format="JPEG")
                meta = {"filename": f"{wnids[label]}/{key}.JPEG", "label": label, "width": 40, "height": 32}
                w.write({"__key__": key, "jpg": buf.getvalue(), "cls": str(label), "json": json.dumps(meta)})
                want.append(label)
    m = read_manifest(shard(_cfg(urls=str(tmp_path / "tars" / "imagenet-val-{0000..0001}.tar"), name="val",
                                 manifest=str(tmp_path / "val.json"))))
    assert m.class_map == {w: i for i, w in enumerate(wnids)} and m.labeled
    assert [r["label"] for k in range(2) for r in iter_shard(m, k, decode=False)] == want
    assert "labels from .cls/.json" in m.source


def test_index_refuses_half_labeled_tars(tmp_path):
    import webdataset as wds

    (tmp_path / "tars").mkdir()
    with wds.TarWriter(str(tmp_path / "tars" / "y-000000.tar")) as w:
        for i in range(3):
            buf = io.BytesIO()
            _photo(i).save(buf, format="JPEG")
            w.write({"__key__": f"s{i}", "jpg": buf.getvalue(), **({"cls": "1"} if i != 1 else {})})
    with pytest.raises(ShardError, match="y-000000.tar: sample 1 has no class label"):
        shard(_cfg(urls=str(tmp_path / "tars" / "y-000000.tar"), manifest=str(tmp_path / "y.json")))


def test_index_refuses_uneven_tars_and_missing_ones(tmp_path):
    _foreign_tars(tmp_path / "tars", [3, 2, 3])
    with pytest.raises(ShardError, match="x-000001.tar holds 2 samples but shard_size is 3"):
        shard(_cfg(urls=str(tmp_path / "tars" / "x-{000000..000002}.tar"), manifest=str(tmp_path / "x.json")))
    with pytest.raises(ShardError, match="no such list file"):
        shard(_cfg(urls=str(tmp_path / "nolist.txt"), manifest=str(tmp_path / "z.json")))
    with pytest.raises(ShardError, match="x-000003.tar does not exist"):
        shard(_cfg(urls=str(tmp_path / "tars" / "x-{000002..000003}.tar"), manifest=str(tmp_path / "y.json")))


# ---- the bundled sample ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    base = tmp_path_factory.mktemp("sample")
    cfg = dict(sample=True, out_dir=str(base / "shards"), manifest=str(base / "manifests" / "sample.json"))
    path = shard(_cfg(**cfg))
    return base, cfg, path


def test_sample_counts_and_manifests(sample):
    base, _, path = sample
    m = read_manifest(path)
    tr = read_manifest(base / "manifests" / "sample-probe-train.json")
    te = read_manifest(base / "manifests" / "sample-probe-test.json")
    assert (m.total, m.shard_size, m.num_shards, m.class_map) == (512, 128, 4, None)
    assert (tr.total, te.total) == (200, 100)
    assert tr.class_map == te.class_map and sorted(tr.class_map.values()) == list(range(10))
    for man in (m, tr, te):
        verify_shards(man)
    labels_tr = [r["label"] for k in range(tr.num_shards) for r in iter_shard(tr, k, decode=False)]
    labels_te = [r["label"] for r in iter_shard(te, 0, decode=False)]
    assert np.bincount(labels_tr).tolist() == [20] * 10 and np.bincount(labels_te).tolist() == [10] * 10
    first = next(iter_shard(m, 0))
    assert first["label"] == -1 and 96 <= min(first["image"].size) <= 192 and first["image"].mode == "RGB"
    assert "scikit-image" in m.source and "jpeg_quality=90" in m.source


def _boxes(man):
    """{photo: [crop boxes]} from each sample's recorded source."""
    out = {}
    for k in range(man.num_shards):
        with tarfile.open(man.shard_url(k)) as t:
            for member in t.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(t.extractfile(member).read())
                    box = tuple(int(v) for v in
                                re.search(r"crop \((\d+), (\d+), (\d+), (\d+)\)", meta["source"]).groups())
                    out.setdefault(meta["name"].split("/")[0], []).append(box)
    return out


def test_sample_probe_test_pixels_are_held_out(sample):
    base, _, path = sample
    test = _boxes(read_manifest(base / "manifests" / "sample-probe-test.json"))
    seen = [_boxes(read_manifest(path)), _boxes(read_manifest(base / "manifests" / "sample-probe-train.json"))]
    overlaps = 0
    for photo, tboxes in test.items():
        for other in seen:
            for (a0, b0, a1, b1) in other.get(photo, []):
                for (c0, d0, c1, d1) in tboxes:
                    overlaps += (min(a1, c1) > max(a0, c0)) and (min(b1, d1) > max(b0, d0))
    assert len(test) == 10 and overlaps == 0


def test_sample_rerun_is_a_no_op_and_rebuild_is_identical(tmp_path, capfd):
    base = tmp_path
    cfg = dict(sample=True, out_dir=str(base / "shards"), manifest=str(base / "manifests" / "sample.json"),
               sample_train=40, sample_probe_train=2, sample_probe_test=1, shard_size=16)
    shard(_cfg(**cfg))
    manifests = sorted((base / "manifests").iterdir())
    before = {p.name: p.read_bytes() for p in manifests}
    tars = sorted((base / "shards").rglob("*.tar"))
    hashes = {p: _sha(p) for p in tars}
    shard(_cfg(**cfg))
    assert "up to date" in capfd.readouterr().err
    assert {p.name: p.read_bytes() for p in manifests} == before
    shard(_cfg(**cfg, overwrite=True))  # rebuilt from scratch: byte-identical tars
    assert {p: _sha(p) for p in tars} == hashes
    # a different sample in the same place is refused, naming the file
    with pytest.raises(ShardError, match="sample-000000.tar already exists"):
        shard(_cfg(**cfg, seed=1))
    # a damaged copy of the same sample (tar changed or deleted) is rebuilt in place, identically
    tars[0].write_bytes(b"tampered")
    tars[-1].unlink()
    shard(_cfg(**cfg))
    assert capfd.readouterr().err.count("rebuilding this sample") == 2
    assert {p: _sha(p) for p in tars} == hashes
    # SOURCE_DATE_EPOCH pins `created`, so a rebuild gives byte-identical manifests as well
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    try:
        shard(_cfg(**cfg, overwrite=True))
        first = (base / "manifests" / "sample.json").read_bytes()
        shard(_cfg(**cfg, overwrite=True))
        assert (base / "manifests" / "sample.json").read_bytes() == first
        assert read_manifest(base / "manifests" / "sample.json").created == "2023-11-14T22:13:20Z"
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]


def test_sample_counts_are_parameters(tmp_path):
    path = shard(_cfg(sample=True, out_dir=str(tmp_path / "s"), manifest=str(tmp_path / "tiny.json"),
                      sample_train=40, sample_probe_train=2, sample_probe_test=1, shard_size=16, name="tiny"))
    assert [read_manifest(p).total
            for p in (path, tmp_path / "tiny-probe-train.json", tmp_path / "tiny-probe-test.json")] == [40, 20, 10]
    assert [s.count for s in read_manifest(path).shards] == [16, 16, 8]


def test_manifest_pointing_at_missing_tar(tree, tmp_path):
    root, _ = tree
    m = read_manifest(shard(_cfg(input=str(root), name="d", out_dir=str(tmp_path / "o"),
                                 manifest=str(tmp_path / "d.json"), shard_size=4)))
    os.remove(m.shard_url(1))
    with pytest.raises(ManifestError, match="d-000001.tar is missing"):
        verify_shards(m)
    with pytest.raises(ManifestError, match="d-000001.tar is missing"):
        list(iter_shard(m, 1))


def test_fsspec_urls_for_tars_and_manifest(tree):
    """Tars and manifest on a non-local fsspec filesystem (memory://): written, indexed and read back."""
    import fsspec

    from pipeline.data.reading import read_shard_records

    root, want = tree
    fs = fsspec.filesystem("memory")
    try:
        path = shard(_cfg(input=str(root), name="mem", out_dir="memory://hdpipe-test/shards",
                          manifest="memory://hdpipe-test/mem.json", shard_size=4))
        m = read_manifest("memory://hdpipe-test/mem.json")
        assert path == "memory://hdpipe-test/mem.json" and m.total == len(want)
        assert m.shards[0].url == "memory://hdpipe-test/shards/mem/mem-000000.tar"
        verify_shards(m)
        assert m.shards[1].sha256 == hashlib.sha256(fs.cat("/hdpipe-test/shards/mem/mem-000001.tar")).hexdigest()
        names = [r["name"] for k in range(m.num_shards) for r in read_shard_records(m, k)]
        assert sorted(names) == sorted(want)
        # index the same tars by URL pattern into a second manifest: same content digest
        m2 = read_manifest(shard(_cfg(urls="memory://hdpipe-test/shards/mem/mem-{000000..000002}.tar",
                                      manifest="memory://hdpipe-test/mem2.json")))
        assert m2.digest() == m.digest()
    finally:
        if fs.exists("/hdpipe-test"):
            fs.rm("/hdpipe-test", recursive=True)


def test_sample_sizes_without_sample_are_refused(tmp_path):
    """A --sample-* size given with --input would be silently ignored: it is an error naming the key."""
    from pipeline.config import resolve
    from pipeline.errors import ConfigError
    from stages.shard import ShardConfig

    with pytest.raises(ConfigError, match="sample_train only applies to --sample"):
        resolve(ShardConfig, {"input": str(tmp_path), "sample_train": 10})
    assert resolve(ShardConfig, {"sample": True, "sample_train": 10}).sample_train == 10
