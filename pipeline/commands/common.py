"""Options and helpers shared by the commands."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.config import check_keys, check_mapping, load_section, resolve
from pipeline.errors import ConfigError

config_option = click.option(
    "--config",
    "config_path",
    type=str,
    default=None,
    metavar="FILE[:SECTION]",
    help="YAML params file; the command reads its own section (as in params.yaml), or SECTION when "
    "given (e.g. params.yaml:extract_clip). Flags given on the command line override it.",
)


def split_config_path(config_path: str, default_section: str) -> tuple[str, str]:
    """'params.yaml:extract_mim' -> ('params.yaml', 'extract_mim'); a plain path keeps the command's section.

    Only a suffix after the last ':' that is not itself an existing file counts as a section, so
    paths that contain ':' still work.
    """
    head, sep, tail = config_path.rpartition(":")
    if sep and head and tail and "/" not in tail and not Path(config_path).exists():
        return head, tail
    return config_path, default_section


def build_config(cls: type, config_path: str | None, section: str, flags: dict[str, Any]):
    """Defaults < `section` of `config_path` < flags given on the command line (None = not given)."""
    if config_path is None:
        return resolve(cls, flags, source="command line")
    path, section = split_config_path(config_path, section)
    file_layer = load_section(path, section)
    # Check the file layer alone first so an unknown key is reported against the file by name.
    check_keys(cls, file_layer, source=f"{path} [{section}]")
    return resolve(cls, file_layer, flags, source="command line")


def parse_mapping(ctx: click.Context, param: click.Parameter, value: str | None) -> dict | None:
    """Click callback: a YAML or JSON mapping ('{img_size: 64, patch_size: 8}') -> dict; None when not given."""
    if value is None:
        return None
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--{param.name.replace('_', '-')} is not a YAML/JSON mapping: {e}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"--{param.name.replace('_', '-')} must be a mapping like '{{img_size: 64}}', got {value!r}")
    check_mapping(f"--{param.name.replace('_', '-')}", parsed)
    return parsed
