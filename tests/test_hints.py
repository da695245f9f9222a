"""Every fix-it command hdpipe prints is run as printed, and must succeed.

Each case provokes a refusal with real stores (tiny random-init teachers), takes the commands
between backticks from the message, runs them through the real CLI, then retries what failed with
the options the message names. No hint may overwrite a store the failing command did not make.
"""
from __future__ import annotations

import re
import shlex
import shutil

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.errors import HdpipeError, StoreError
from pipeline.train.sources import resolve_sources
from stages.extract import ExtractConfig, extract
from toydata import structured_jpeg, write_dataset

MIM = "timm:vit_tiny_patch16_224"
DISC = "timm:deit_tiny_patch16_224"
KW = {"img_size": 32, "patch_size": 8, "depth": 3}


def _dataset(folder, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return write_dataset(folder, [structured_jpeg(rng, (40, 60)) for _ in range(12)], 6)


def _mim(manifest: str, out: str, **kw) -> ExtractConfig:
    base = dict(manifest=manifest, teacher=MIM, role="mim", random_init=True, model_kwargs=KW, out=out, views=1,
                batch_size=16, device="cpu", progress=False)
    return ExtractConfig(**{**base, **kw})


def _disc(manifest: str, out: str, mim: str, **kw) -> ExtractConfig:
    base = dict(manifest=manifest, teacher=DISC, role="disc", random_init=True, model_kwargs=KW, out=out,
                mim_store=mim, batch_size=16, device="cpu", progress=False)
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hints")
    a = _dataset(root / "a", 0)
    b = _dataset(root / "b", 1)
    mim = extract(_mim(a, str(root / "t" / "mae.zarr"), views=2, seed=3))
    disc = extract(_disc(a, str(root / "t" / "clip.zarr"), mim))
    return {"root": root, "a": a, "b": b, "mim": mim, "disc": disc, "markers": _markers(mim, disc)}


def _markers(*stores: str) -> dict:
    """Done markers and their bytes: a store rebuilt or rewritten in place changes them."""
    from pathlib import Path

    return {str(p): p.read_bytes() for s in stores for p in sorted(Path(s).glob("done/*.json"))}


def run_hints(err: Exception) -> dict[str, str]:
    """Run every `hdpipe ...` command in the message (in order); returns the options it names
    after 'then run with' as {option: value}."""
    msg = str(err)
    commands = re.findall(r"`(hdpipe [^`]+)`", msg)
    assert commands, f"no runnable command in: {msg}"
    for cmd in commands:
        assert "--overwrite" not in cmd, f"a hint overwrites a store the failing command did not make: {cmd}"
        argv = shlex.split(cmd)
        assert main(argv[1:] + ["--no-progress"]) == 0, cmd
    tail = msg.split("then run with", 1)[1] if "then run with" in msg else ""
    return dict(re.findall(r"--([a-z-]+) (\S+)", tail))


def _sources(manifest, mim, disc, **kw):
    return resolve_sources(manifest, mim, disc, kw.get("masking", "progressive"), kw.get("layers"),
                           kw.get("target", "relations"))


def test_incomplete_stores_are_finished_by_their_hint(world, tmp_path):
    mim, disc = tmp_path / "mae.zarr", tmp_path / "clip.zarr"
    shutil.copytree(world["mim"], mim)
    shutil.copytree(world["disc"], disc)
    (mim / "done" / "000001.json").unlink()
    with pytest.raises(StoreError, match="incomplete") as err:  # read by a discriminative extraction
        extract(_disc(world["a"], str(tmp_path / "other.zarr"), str(mim)))
    run_hints(err.value)
    extract(_disc(world["a"], str(tmp_path / "other.zarr"), str(mim)))
    (disc / "done" / "000000.json").unlink()
    with pytest.raises(StoreError, match="incomplete") as err:  # read by stage two
        _sources(world["a"], str(mim), str(disc))
    run_hints(err.value)
    _sources(world["a"], str(mim), str(disc))


def test_disc_extraction_from_another_manifest(world, tmp_path):
    with pytest.raises(StoreError, match="another manifest") as err:
        extract(_disc(world["b"], str(tmp_path / "clip.zarr"), world["mim"]))
    opts = run_hints(err.value) | dict(re.findall(r"pass --(mim-store) (\S+)$", str(err.value)))
    extract(_disc(world["b"], str(tmp_path / "clip.zarr"), opts["mim-store"]))


@pytest.mark.parametrize("case", ["manifest", "disagree", "masking", "layers", "target"])
def test_stage_two_refusals(world, tmp_path, case):
    a, mim, disc = world["a"], world["mim"], world["disc"]
    args = dict(manifest=a, mim=mim, disc=disc, kw={})
    if case == "manifest":
        args["manifest"] = world["b"]
    elif case == "disagree":  # a disc store built against another MIM store (other view plan)
        other = extract(_mim(a, str(tmp_path / "mae-seed9.zarr"), views=2, seed=9))
        args["mim"] = other
    elif case == "masking":
        args["kw"] = {"masking": "random"}
    elif case == "layers":
        args["kw"] = {"layers": (1, 2, 3)}
    else:
        args["kw"] = {"target": "attention"}
    with pytest.raises(HdpipeError) as err:
        _sources(args["manifest"], args["mim"], args["disc"], **args["kw"])
    opts = run_hints(err.value)
    src = _sources(args["manifest"], opts.get("mim-store", args["mim"]), opts.get("disc-store", args["disc"]),
                   **args["kw"])
    assert src.view_store == opts.get("mim-store", args["mim"])
    assert _markers(world["mim"], world["disc"]) == world["markers"]  # the stores the run read are untouched
