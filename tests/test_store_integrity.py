"""Damaged target stores never train: flipped bytes, missing and truncated Zarr shard files and a
broken done marker are each an IntegrityError naming the store, shard, array and the command that
rebuilds exactly that shard; `inspect` reports them (exit 1), and `extract` rebuilds them to the
same bytes. Real extraction (tiny random-init timm teachers), real tars, real Zarr on disk, the
real `hdpipe` commands."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as cli_main
from pipeline.errors import IntegrityError, ShardDamagedError
from pipeline.targets.store import TargetStore
from toydata import structured_jpeg, write_dataset

KW = {"img_size": 64, "patch_size": 8, "depth": 4}
DISC_KW = {"img_size": 64, "patch_size": 8, "depth": 2}
STUDENT_KW = {"img_size": 64, "patch_size": 8, "depth": 3}


def _hdpipe(args: list[str]) -> int:
    """Run the real CLI in this process; its exit status."""
    return int(cli_main(args) or 0)


def _extract_args(manifest: str, out: Path, precision: str = "fp16") -> list[str]:
    return ["extract", "--manifest", manifest, "--teacher", "timm:vit_tiny_patch16_224", "--role", "mim",
            "--random-init", "--model-kwargs", json.dumps(KW), "--out", str(out), "--views", "2",
            "--precision", precision, "--batch-size", "16", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    rng = np.random.default_rng(0)
    manifest = write_dataset(root / "data", [structured_jpeg(rng, (72, 100)) for _ in range(16)], 8)
    clean = root / "clean.zarr"
    assert _hdpipe(_extract_args(manifest, clean)) == 0
    disc = root / "disc.zarr"
    assert _hdpipe(["extract", "--manifest", manifest, "--teacher", "timm:deit_tiny_patch16_224", "--random-init",
                  "--model-kwargs", json.dumps(DISC_KW), "--mim-store", str(clean), "--out", str(disc),
                  "--batch-size", "16", "--device", "cpu", "--no-progress"]) == 0
    return {"root": root, "manifest": manifest, "clean": clean, "disc": disc}


def _copy(world, tmp_path) -> Path:
    out = tmp_path / "mim.zarr"
    shutil.copytree(world["clean"], out)
    return out


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and "done" not in p.parts and p.name != "extract-config.json"}


def _flip(path: Path, at: int, n: int = 3) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _rebuild_cmd(message: str) -> list[str]:
    cmd = message.split("`")[1]
    assert cmd.startswith("hdpipe extract ") and "--rebuild-shards 1" in cmd and "--overwrite" not in cmd
    return shlex.split(cmd)[1:] + ["--no-progress"]


@pytest.mark.parametrize("damage", ["flip_chunk", "flip_index", "truncate", "delete"])
def test_damaged_shard_is_refused_named_and_rebuilt_to_the_same_bytes(world, tmp_path, damage, capsys):
    store_dir = _copy(world, tmp_path)
    before = _files(store_dir)
    shard_file = store_dir / "relations" / "c" / "1" / "0" / "0" / "0" / "0" / "0"
    assert shard_file.is_file()
    if damage == "flip_chunk":
        _flip(shard_file, 40)  # inside the first chunk's compressed bytes
    elif damage == "flip_index":
        _flip(shard_file, shard_file.stat().st_size - 12)  # inside the shard index
    elif damage == "truncate":
        shard_file.write_bytes(shard_file.read_bytes()[:-100])
    else:
        shard_file.unlink()
    store = TargetStore.open(str(store_dir))
    for read in (lambda: store.read_shard(1, ["relations"]),
                 lambda: store.read_shard_views(1, ["relations"], np.zeros(8, np.int64)),
                 lambda: store.read_rows([8, 9, 10], ["relations"])):
        with pytest.raises(ShardDamagedError) as err:
            read()
        assert err.value.shard == 1 and err.value.array == "relations", str(err.value)
        assert str(store_dir) in str(err.value)
    store.read_shard(0)  # the other shard is untouched and still reads
    assert isinstance(err.value, IntegrityError)
    cmd = _rebuild_cmd(str(err.value))
    # inspect: lengths catch a missing or truncated file; --content reads every chunk
    capsys.readouterr()
    cheap = damage in ("truncate", "delete")
    assert _hdpipe(["inspect", str(store_dir)] + ([] if cheap else ["--content"])) == 1
    assert "damaged        1 (shard 1: array 'relations'" in capsys.readouterr().out
    # the command the error names rebuilds exactly that shard: the store equals the clean one
    assert _hdpipe(cmd) == 0
    assert "1 of 2 shards to do" in capsys.readouterr().err
    assert _files(store_dir) == before
    assert _hdpipe(["inspect", str(store_dir), "--content"]) == 0


def test_extract_rerun_rebuilds_a_missing_file_by_itself(world, tmp_path, capsys):
    """A plain rerun of the same extract command finds shards whose files are missing or truncated."""
    store_dir = _copy(world, tmp_path)
    before = _files(store_dir)
    (store_dir / "keep_progressive" / "c" / "0" / "0" / "0").unlink()
    capsys.readouterr()
    assert _hdpipe(_extract_args(world["manifest"], store_dir)) == 0
    err = capsys.readouterr().err
    assert "shard 0 of" in err and "is damaged" in err and "1 of 2 shards to do" in err
    assert _files(store_dir) == before


def test_unparsable_done_marker_is_damage(world, tmp_path):
    store_dir = _copy(world, tmp_path)
    (store_dir / "done" / "000001.json").write_text('{"shard": 1, "fi')
    with pytest.raises(ShardDamagedError, match="shard 1 .*done marker is not JSON"):
        TargetStore.open(str(store_dir)).read_shard(1)


def test_distill_on_a_damaged_store_is_one_line_and_trains_nothing(world, tmp_path, capsys):
    store_dir = _copy(world, tmp_path)
    _flip(store_dir / "relations" / "c" / "0" / "0" / "0" / "0" / "0" / "0", 60)
    runs = tmp_path / "runs"
    capsys.readouterr()
    assert _hdpipe(["distill", "--manifest", world["manifest"], "--mim-store", str(store_dir), "--disc-store",
                  str(world["disc"]), "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(STUDENT_KW),
                  "--epochs", "1", "--batch-size", "4", "--workers", "0", "--runs-dir", str(runs), "--name", "t",
                  "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "shard 0 of array 'relations' is damaged" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (runs / "t" / "student").exists()
    log = runs / "t" / "log.jsonl"
    assert not log.exists() or not [line for line in log.read_text().splitlines() if '"loss"' in line]


def test_q1pct_store_is_checked_too(world, tmp_path):
    out = tmp_path / "q.zarr"
    assert _hdpipe(_extract_args(world["manifest"], out, precision="q1pct")) == 0
    store = TargetStore.open(str(out))
    marker = store.done_marker(1)
    assert marker["files"] and all(v > 0 for v in marker["files"].values())
    assert sum(marker["files"].values()) == marker["bytes"]
    victim = next(k for k in marker["files"] if k.startswith("relations_"))
    _flip(out / victim, 30)
    with pytest.raises(ShardDamagedError, match="shard 1 of array 'relations'"):
        store.read_shard(1)


def test_a_full_disk_during_extraction_is_one_line_and_trusts_nothing_half_written(world, tmp_path, capsys,
                                                                                  monkeypatch):
    """ENOSPC while shard 1 is written (by the whole-shard writer or by Zarr): one line, exit 2, no done
    marker for that shard (shard 0 stays done), and a rerun with space again finishes the store to the
    same bytes as the clean one."""
    import errno

    import zarr

    from pipeline import urls

    out = tmp_path / "mim.zarr"
    real_set, real_replace = zarr.storage.LocalStore.set, urls._replace_locally

    async def full_disk(self, key, value):
        if "/c/1/" in key:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    def full_disk_file(path, data):
        if "/c/1/" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(path, data)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_disk)
    monkeypatch.setattr(urls, "_replace_locally", full_disk_file)
    capsys.readouterr()
    assert _hdpipe(_extract_args(world["manifest"], out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (err[-1].startswith("hdpipe: error: cannot write") and "(ENOSPC)" in err[-1]
            and "Traceback" not in "\n".join(err))
    assert sorted(p.name for p in (out / "done").iterdir()) == ["000000.json"]
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    monkeypatch.setattr(urls, "_replace_locally", real_replace)
    assert _hdpipe(_extract_args(world["manifest"], out)) == 0
    got, want = _files(out), _files(world["clean"])
    assert got.pop("zarr.json") != b"" and want.pop("zarr.json") != b""  # differ only by their `created` time
    assert got == want
