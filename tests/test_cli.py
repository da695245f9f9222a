"""CLI basics: help on every command, --version, one-line user errors (exit 2), --debug, --config."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline import __version__
from pipeline.cli import COMMANDS, cli, main
from pipeline.data.manifest import read_manifest


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (folder / f"{i:02d}.jpg").write_bytes(buf.getvalue())


# What a user can run, written out here (not read from pipeline.cli.COMMANDS, which this checks):
# a command dropped or renamed in the code fails this list.
EXPECTED_COMMANDS = ("shard", "extract", "inspect", "verify", "distill", "evaluate", "analyze")


def _present_commands():
    return [name for name in cli.list_commands(None)]


def test_the_commands_are_exactly_the_expected_ones():
    assert sorted(_present_commands()) == sorted(EXPECTED_COMMANDS)
    assert sorted(name for _, name, _ in COMMANDS) == sorted(EXPECTED_COMMANDS)


def test_group_help_lists_every_present_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: hdpipe" in out
    present = _present_commands()
    assert "shard" in present
    for name in present:
        assert f"  {name} " in out or f"  {name}\n" in out


@pytest.mark.parametrize("name", EXPECTED_COMMANDS)
def test_help_on_every_command(capsys, name):
    assert name in _present_commands()  # every advertised command is really there
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: hdpipe {name}") and "--help" in out and "Options:" in out
    # `hdpipe --help` lists commands without importing them: its line must be the command's own
    short = dict((c, h) for _, c, h in COMMANDS)[name].removesuffix("...")
    doc = " ".join(cli.get_command(None, name).help.split("\n\n")[0].split())
    assert doc.startswith(short), (short, doc)


STAGE_CONFIGS = [("shard", "stages.shard", "ShardConfig"), ("extract", "stages.extract", "ExtractConfig"),
                 ("distill", "stages.distill", "DistillConfig"), ("evaluate", "stages.evaluate", "EvaluateConfig"),
                 ("analyze", "stages.analyze", "AnalyzeConfig"), ("verify", "stages.verify", "VerifyConfig")]


@pytest.mark.parametrize("name, module, cls", STAGE_CONFIGS)
def test_every_config_field_is_an_option_with_its_comment_and_default(name, module, cls):
    """Config is written once: each dataclass field is an option whose help is the field's comment
    and whose [default: ...] is the dataclass default; nothing else is a config option."""
    import dataclasses
    import importlib

    from pipeline.commands.common import default_of, default_text, field_comments

    config = getattr(importlib.import_module(module), cls)
    command = cli.get_command(None, name)
    options = {p.name: p for p in command.params if isinstance(p, __import__("click").Option)}
    comments = field_comments(config)
    for f in dataclasses.fields(config):
        if name == "verify" and f.name == "store":
            continue  # the positional STORE argument
        opt = options.pop(f.name)
        assert comments[f.name] and opt.help.startswith(comments[f.name]), f.name
        shown = default_text(default_of(f))
        assert (f"[default: {shown}]" in opt.help) == (shown is not None), (f.name, opt.help)
    assert set(options) <= {"config_path", "as_json", "help"}, f"options that are not config fields: {set(options)}"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hdpipe, version {__version__}"


def _run(*args, cwd=None):
    """The installed console script, as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "hdpipe")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd)


def test_user_error_is_one_line_with_exit_2_and_debug_shows_traceback(tmp_path):
    missing = str(tmp_path / "nope")
    r = _run("shard", "--input", missing, "--no-progress", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == f"hdpipe: error: input folder {missing} does not exist\n"
    assert r.stdout == ""
    r = _run("--debug", "shard", "--input", missing, "--no-progress", cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr and "ShardError: input folder" in r.stderr


@pytest.mark.parametrize("args,fragment", [
    (["shard"], "exactly one of --input FOLDER, --urls LIST_OR_PATTERN, --sample"),
    (["shard", "--input", "x", "--jpeg-quality", "0"], "jpeg_quality must be in 1..95"),
    (["shard", "--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["extract", "--model-kwargs", "{img_size:32}"], "'--model-kwargs' key 'img_size:32' holds a ':'"),
    (["extract", "--model-kwargs", "{img_size: 32, depth:}"], "'--model-kwargs' key 'depth' has no value"),
    (["evaluate", "--model-kwargs", "{vision_cfg: {image_size:32}}"],
     "'--model-kwargs.vision_cfg' key 'image_size:32'"),
    (["extract", "--model-kwargs", "{depth: 2, depth: 3}"], "--model-kwargs: key 'depth' is given twice (line 1, "
                                                            "columns 2 and 12)"),
])
def test_user_errors_in_process(capsys, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hdpipe: error: ") and err.count("\n") == 1 and fragment in err, err


def test_bad_choice_is_a_usage_error(capsys):
    assert main(["shard", "--on-error", "ignore"]) == 2
    assert "Invalid value for '--on-error'" in capsys.readouterr().err


def test_config_section_and_flag_override(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs", 5)
    (tmp_path / "params.yaml").write_text(
        "shard:\n  input: imgs\n  name: fromfile\n  shard_size: 2\n  progress: false\n"
        "extract:\n  teacher: mae\n")
    # the file alone
    assert main(["shard", "--config", "params.yaml"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join("manifests", "fromfile.json")
    m = read_manifest(tmp_path / "manifests" / "fromfile.json")
    assert (m.name, m.shard_size, m.num_shards) == ("fromfile", 2, 3)
    # a flag overrides its key; the other file keys still apply
    assert main(["shard", "--config", "params.yaml", "--shard-size", "4", "--name", "flagged"]) == 0
    m = read_manifest(tmp_path / "manifests" / "flagged.json")
    assert (m.name, m.shard_size, m.num_shards) == ("flagged", 4, 2)
    assert "--shard-size 4" in m.command and "--name flagged" in m.command
    assert json.loads((tmp_path / "manifests" / "flagged.json").read_text())["shards"][0]["url"] == \
        "../data/shards/flagged/flagged-000000.tar"


def test_config_unknown_key_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("shard:\n  input: imgs\n  shardsize: 2\n")
    assert main(["shard", "--config", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'shardsize'" in err and "params.yaml" in err


def test_config_duplicated_key_is_named_with_both_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("shard:\n  input: imgs\n  shard_size: 2\n  shard_size: 4\n")
    assert main(["shard", "--config", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == "hdpipe: error: params.yaml: key 'shard_size' is given twice (lines 3 and 4); YAML would keep " \
                  "only the last: remove one\n"


def test_max_image_pixels_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs", 1)
    Image.new("RGB", (120, 120)).save(tmp_path / "imgs" / "big.png")  # 14,400 pixels
    assert main(["shard", "--input", "imgs", "--no-progress", "--max-image-pixels", "10000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hdpipe: error: ") and err.count("\n") == 1, err
    assert "imgs/big.png: 120x120 = 14400 pixels exceeds max_image_pixels=10000" in err and "--max-image-pixels" in err
    assert main(["shard", "--input", "imgs", "--no-progress", "--max-image-pixels", "14400"]) == 0
    assert read_manifest(tmp_path / "manifests" / "imgs.json").total == 2


@pytest.mark.parametrize("kwargs, fragment", [
    ("{bogus_kw: 1}", "model 'vit_tiny_patch16_224' has no argument 'bogus_kw'"),
    ("{img_size: -64}", "model 'vit_tiny_patch16_224' cannot be built with model kwargs {'img_size': -64}"),
])
def test_model_kwargs_the_teacher_rejects_are_one_line(tmp_path, monkeypatch, capsys, kwargs, fragment):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs", 2)
    assert main(["shard", "--input", "imgs", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["extract", "--manifest", "manifests/imgs.json", "--teacher", "timm:vit_tiny_patch16_224",
                 "--role", "mim", "--random-init", "--model-kwargs", kwargs]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hdpipe: error: {fragment}") and err.count("\n") == 1 and "--model-kwargs" in err, err


def test_sample_from_the_command_line(tmp_path):
    """The embedded default as a user runs it (small counts to stay fast)."""
    args = ["shard", "--sample", "--sample-train", "24", "--sample-probe-train", "2", "--sample-probe-test", "1",
            "--no-progress"]
    r = _run(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.join("manifests", "sample.json")
    assert "hdpipe shard: sample: 24 images in 1 shards" in r.stderr
    assert sorted(os.listdir(tmp_path / "manifests")) == ["sample-probe-test.json", "sample-probe-train.json",
                                                         "sample.json"]
    r = _run(*args, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.count("is up to date") == 3
