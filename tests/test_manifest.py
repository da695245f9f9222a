"""Manifests: round trip, validation errors that name file and key, digest, URL resolution, verify_shards."""
from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest

from pipeline.errors import ManifestError
from pipeline.data.manifest import (SCHEMA_VERSION, Manifest, ShardInfo, read_manifest, verify_shards,
                               write_manifest)


def _tar_like(path, payload: bytes) -> str:
    path.write_bytes(payload)
    return hashlib.sha256(payload).hexdigest()


@pytest.fixture
def dataset(tmp_path):
    """Three fake 'tars' (any bytes: manifests only hash them) and a manifest two folders away."""
    data = tmp_path / "data" / "toy"
    data.mkdir(parents=True)
    shards = []
    for k, count in enumerate((4, 4, 2)):
        sha = _tar_like(data / f"toy-{k:06d}.tar", f"shard {k}".encode())
        shards.append(ShardInfo(url=f"../data/toy/toy-{k:06d}.tar", count=count, first_index=4 * k, sha256=sha))
    m = Manifest(name="toy", shard_size=4, total=10, shards=tuple(shards), class_map={"a": 0, "b": 1},
                 skipped=({"name": "x.jpg", "reason": "broken"},), source="test", command="hdpipe shard", created="now")
    path = tmp_path / "manifests" / "toy.json"
    written = write_manifest(m, path)
    return written, path, data


def test_round_trip(dataset):
    written, path, data = dataset
    back = read_manifest(path)
    assert back == written
    assert back.total == 10 and back.num_shards == 3 and back.labeled and back.num_classes == 2
    assert back.skipped == ({"name": "x.jpg", "reason": "broken"},)
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION == 1
    # atomic write leaves no temporary sibling behind
    assert sorted(os.listdir(path.parent)) == ["toy.json"]
    assert [back.shard_of(i) for i in (0, 3, 4, 9)] == [0, 0, 1, 2]
    with pytest.raises(IndexError):
        back.shard_of(10)


def test_shard_url_resolves_against_manifest_folder(dataset):
    m, path, data = dataset
    assert m.shard_url(1) == str(data / "toy-000001.tar")
    assert os.path.isfile(m.shard_url(2))
    # absolute URLs are kept; relative ones resolve against a URL manifest's folder too
    remote = Manifest(name="r", shard_size=4, total=4,
                      shards=(ShardInfo("shards/r-000000.tar", 4, 0, "0" * 64),), class_map=None,
                      path="s3://bucket/manifests/r.json")
    assert remote.shard_url(0) == "s3://bucket/manifests/shards/r-000000.tar"
    absolute = Manifest(name="a", shard_size=4, total=4,
                        shards=(ShardInfo("gs://b/a-000000.tar", 4, 0, "0" * 64),), class_map=None)
    assert absolute.shard_url(0) == "gs://b/a-000000.tar"
    unplaced = Manifest(name="u", shard_size=4, total=4, shards=(ShardInfo("a.tar", 4, 0, "0" * 64),), class_map=None)
    with pytest.raises(ManifestError, match="relative shard URL"):
        unplaced.shard_url(0)


def test_digest_ignores_urls_but_not_content(dataset):
    m, _, _ = dataset
    h = hashlib.sha256(b"hdpipe-manifest-v1\n")
    for s in m.shards:
        h.update(f"{s.first_index} {s.count} {s.sha256}\n".encode())
    assert m.digest() == h.hexdigest()
    moved = Manifest(**{**m.__dict__, "shards": tuple(ShardInfo("s3://elsewhere/" + s.url[-15:], s.count,
                                                                 s.first_index, s.sha256) for s in m.shards)})
    assert moved.digest() == m.digest()
    changed = list(m.shards)
    changed[1] = ShardInfo(changed[1].url, changed[1].count, changed[1].first_index, "f" * 64)
    assert Manifest(**{**m.__dict__, "shards": tuple(changed)}).digest() != m.digest()


def test_max_image_pixels_round_trips_and_old_manifests_read_with_the_default(dataset, tmp_path):
    """The pixel limit a dataset was sharded with is recorded and read back; a manifest written before
    the field existed reads with hdpipe's default and keeps its digest, so stores built from it stay valid."""
    from pipeline.data.images import DEFAULT_MAX_PIXELS

    m, path, _ = dataset
    assert m.max_image_pixels == DEFAULT_MAX_PIXELS == 178_956_970
    raised = write_manifest(Manifest(**{**m.__dict__, "max_image_pixels": 400_000_000}), tmp_path / "raised.json")
    assert json.loads((tmp_path / "raised.json").read_text())["max_image_pixels"] == 400_000_000
    back = read_manifest(tmp_path / "raised.json")
    assert back == raised and back.max_image_pixels == 400_000_000
    assert back.digest() == m.digest()  # the limit is not content: the tars are the same
    old = json.loads(path.read_text())
    del old["max_image_pixels"]  # as written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    before = read_manifest(tmp_path / "old.json")
    assert before.max_image_pixels == DEFAULT_MAX_PIXELS and before.digest() == m.digest()
    h = hashlib.sha256(b"hdpipe-manifest-v1\n")  # the digest's definition, unchanged
    for s in old["shards"]:
        h.update(f"{s['first_index']} {s['count']} {s['sha256']}\n".encode())
    assert before.digest() == h.hexdigest()


def _set(doc, dotted, value):
    *parts, last = dotted.split(".")
    node = doc
    for p in parts:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value


_DELETE = object()

# (mutation path, new value, expected key named in the message, message fragment)
BAD = [
    ("schema_version", 2, "schema_version", "this hdpipe reads version 1"),
    ("schema_version", _DELETE, "schema_version", "missing"),
    ("name", "", "name", "must not be empty"),
    ("shard_size", 0, "shard_size", ">= 1"),
    ("shard_size", "4", "shard_size", "expected int"),
    ("total", 11, "total", "sum to 10"),
    ("shards.1.first_index", 5, "shards[1].first_index", "contiguous"),
    ("shards.0.count", 3, "shards[0].count", "only the last shard may be shorter"),
    ("shards.2.count", 5, "shards[2].count", "expected 1..4"),
    ("shards.1.count", True, "shards[1].count", "expected int"),
    ("shards.1.sha256", "abc", "shards[1].sha256", "64 lowercase hex"),
    ("shards.0.url", _DELETE, "shards[0].url", "missing"),
    ("shards.0.extra", 1, "shards[0].extra", "unknown key"),
    ("bogus", 1, "bogus", "unknown key"),
    ("class_map", [1, 2], "class_map", "expected an object or null"),
    ("class_map.b", 3, "class_map", "0..C-1"),
    ("class_map.a", "0", "class_map.a", "integer label"),
    ("skipped", [{"name": "x"}], "skipped[0]", "expected"),
    ("created", 5, "created", "expected str"),
    ("max_image_pixels", 0, "max_image_pixels", ">= 1"),
    ("max_image_pixels", "400000000", "max_image_pixels", "expected int"),
    ("max_image_pixels", True, "max_image_pixels", "expected int"),
]


@pytest.mark.parametrize("dotted,value,key,fragment", BAD, ids=[b[0] + ":" + repr(b[1])[:12] for b in BAD])
def test_invalid_manifest_names_file_and_key(dataset, tmp_path, dotted, value, key, fragment):
    _, path, _ = dataset
    doc = json.loads(path.read_text())
    _set(doc, dotted, value)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ManifestError) as e:
        read_manifest(bad)
    msg = str(e.value)
    assert str(bad) in msg and f"'{key}'" in msg and fragment in msg, msg


@pytest.mark.parametrize("content,fragment", [
    (None, "not found"), ("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
])
def test_unreadable_manifest_files(tmp_path, content, fragment):
    p = tmp_path / "m.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ManifestError, match=fragment) as e:
        read_manifest(p)
    assert str(p) in str(e.value)


def test_write_refuses_invalid_manifest(tmp_path):
    m = Manifest(name="x", shard_size=4, total=5, shards=(ShardInfo("x-000000.tar", 4, 0, "0" * 64),), class_map=None)
    with pytest.raises(ManifestError, match="'total'"):
        write_manifest(m, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_verify_shards_names_missing_and_changed_tars(dataset):
    m, _, data = dataset
    verify_shards(m)  # intact
    tar1 = data / "toy-000001.tar"
    tar1.write_bytes(b"tampered")
    verify_shards(m, check_hashes=False)  # existence only: still fine
    with pytest.raises(ManifestError, match="sha256") as e:
        verify_shards(m)
    assert str(tar1) in str(e.value) and "shard 1" in str(e.value)
    tar1.unlink()
    with pytest.raises(ManifestError, match="missing") as e:
        verify_shards(m, check_hashes=False)
    assert str(tar1) in str(e.value)
    verify_shards(m, shard_ids=[0, 2])  # the other shards are still intact


def test_copy_is_equal_and_path_not_compared(dataset):
    m, _, _ = dataset
    other = copy.deepcopy(m)
    assert Manifest(**{**other.__dict__, "path": "/elsewhere/toy.json"}) == m
