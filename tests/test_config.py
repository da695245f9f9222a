"""Config resolution: defaults < YAML section < command line, with errors that name the key."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from pipeline.commands.common import build_config, split_config_path
from pipeline.config import load_section, resolve, write_resolved
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Toy:
    lr: float = 6e-4  # base learning rate at batch 1024
    epochs: int = 300  # passes over the data
    layers: tuple[int, ...] = (10, 11)  # 1-based blocks
    mode: Literal["a", "b"] = "a"  # which mode
    path: str | None = None  # optional path
    extra: dict = field(default_factory=dict)  # passed through


@pytest.fixture
def params(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"toy": {"lr": 1e-3, "layers": [9, 10, 11]}, "other": {"epochs": 5}}))
    return p


def test_layers_override_in_order(params):
    cfg = build_config(Toy, str(params), "toy", {"epochs": 7, "lr": None})
    assert cfg == Toy(lr=1e-3, epochs=7, layers=(9, 10, 11))


def test_section_suffix_selects_another_section(params):
    assert split_config_path(f"{params}:other", "toy") == (str(params), "other")
    assert split_config_path(str(params), "toy") == (str(params), "toy")
    assert build_config(Toy, f"{params}:other", "toy", {}).epochs == 5


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"lrr": 1}, "unknown key 'lrr'"),
        ({"epochs": "many"}, "'epochs' must be an integer"),
        ({"mode": "c"}, "'mode' must be one of"),
        ({"lr": True}, "'lr' must be a number"),
        ({"layers": "x"}, "must be an integer"),
    ],
)
def test_bad_values_name_the_key(layer, message):
    with pytest.raises(ConfigError, match=message):
        resolve(Toy, layer)


def test_mapping_typos_from_yaml_are_refused(tmp_path):
    """`{img_size:32}` (no space) is YAML for the key 'img_size:32' with value null."""
    from stages.extract import ExtractConfig

    (tmp_path / "p.yaml").write_text("extract:\n  model_kwargs: {img_size:32}\n")
    with pytest.raises(ConfigError, match="'model_kwargs' key 'img_size:32' holds a ':'"):
        build_config(ExtractConfig, str(tmp_path / "p.yaml"), "extract", {})


@pytest.mark.parametrize("text, key, where", [
    ("distill:\n  lr: 1e-3\n  lr: 2e-3\n", "lr", "lines 2 and 3"),  # in a section
    ("distill:\n  lr: 1e-3\nother: {}\ndistill:\n  lr: 2e-3\n", "distill", "lines 1 and 4"),  # a section twice
    ("distill:\n  extra:\n    a: 1\n    b: 2\n    a: 3\n", "a", "lines 3 and 5"),  # nested
    ("distill:\n  extra: {depth: 2, depth: 3}\n", "depth", "line 2, columns 11 and 21"),  # inline, one line
])
def test_duplicated_keys_in_a_params_file_name_the_file_key_and_lines(tmp_path, text, key, where):
    """Plain YAML keeps the last of two equal keys: the first would be silently ignored."""
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        build_config(Toy, str(tmp_path / "p.yaml"), "distill", {})
    assert str(e.value).startswith(f"{tmp_path / 'p.yaml'}: key '{key}' is given twice ({where})"), e.value


def test_merge_keys_may_still_be_overridden(tmp_path):
    (tmp_path / "p.yaml").write_text("base: &b {lr: 1.0, epochs: 3}\ndistill:\n  <<: *b\n  lr: 2.0\n")
    assert load_section(tmp_path / "p.yaml", "distill") == {"lr": 2.0, "epochs": 3}


def test_duplicated_key_in_an_inline_mapping_names_the_option():
    import click

    from pipeline.commands.common import config_options
    from stages.extract import ExtractConfig

    @click.command()
    @config_options(ExtractConfig)
    def cmd(**flags):
        pass

    with pytest.raises(ConfigError, match=r"^--model-kwargs: key 'depth' is given twice \(line 1, columns 2 and 12\)"):
        cmd.main(["--model-kwargs", "{depth: 2, depth: 3}"], standalone_mode=False)
    with pytest.raises(ConfigError, match=r"^--model-kwargs: key 'image_size' is given twice"):
        cmd.main(["--model-kwargs", "{vision_cfg: {image_size: 32, image_size: 64}}"], standalone_mode=False)


def test_strings_from_the_command_line_are_coerced():
    cfg = resolve(Toy, {"layers": "10,11", "epochs": "3", "lr": "1e-4", "path": "x"})
    assert cfg.layers == (10, 11) and cfg.epochs == 3 and cfg.lr == 1e-4 and cfg.path == "x"


def test_unknown_key_in_file_names_the_file(params, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"toy": {"alpha": 1}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml \[toy\]"):
        build_config(Toy, str(bad), "toy", {})


def test_missing_file_and_section_are_errors(params, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_section(tmp_path / "nope.yaml", "toy")
    with pytest.raises(ConfigError, match="no 'nosuch' section"):
        load_section(params, "nosuch")


def test_resolved_config_round_trips(tmp_path):
    cfg = resolve(Toy, {"epochs": 2})
    out = write_resolved(cfg, tmp_path / "run" / "config.yaml")
    assert resolve(Toy, yaml.safe_load(out.read_text())) == cfg


@pytest.mark.parametrize("params_file", ["params.yaml", "params-imagenet.yaml"])
def test_shipped_params_files_resolve_for_every_stage(params_file):
    """Every section of the shipped params files builds its stage config (no stale or misspelled key)."""
    from pathlib import Path

    from stages.analyze import AnalyzeConfig
    from stages.distill import DistillConfig
    from stages.evaluate import EvaluateConfig
    from stages.extract import ExtractConfig
    from stages.shard import ShardConfig

    path = Path(__file__).resolve().parents[1] / params_file
    sections = {"shard": ShardConfig, "extract_mim": ExtractConfig, "extract_disc": ExtractConfig,
                "distill": DistillConfig, "evaluate": EvaluateConfig, "analyze": AnalyzeConfig}
    doc = yaml.safe_load(path.read_text())
    assert set(doc) == set(sections)
    for section, cls in sections.items():
        cfg = build_config(cls, f"{path}:{section}", section, {})
        assert isinstance(cfg, cls)
