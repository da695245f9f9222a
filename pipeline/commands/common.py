"""Options and helpers shared by the commands."""
from __future__ import annotations

from typing import Any

import click

from pipeline.config import check_keys, load_section, resolve

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML params file; the command reads its own section (as in params.yaml). Flags override it.",
)


def build_config(cls: type, config_path: str | None, section: str, flags: dict[str, Any]):
    """Defaults < `section` of `config_path` < flags given on the command line (None = not given)."""
    file_layer = load_section(config_path, section)
    # Resolve the file layer alone first so an unknown key is reported against the file by name.
    check_keys(cls, file_layer, source=f"{config_path} [{section}]")
    return resolve(cls, file_layer, flags, source="command line")
