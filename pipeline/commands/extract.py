"""`hdpipe extract`: wiring only; the work is `stages.extract.extract`."""
from __future__ import annotations

import click

from pipeline.commands.common import build_config, config_option, config_options, given
from stages.extract import ExtractConfig


@click.command("extract")
@config_option
@config_options(ExtractConfig)
def command(config_path, **flags):
    """Run a frozen teacher once per view and store its targets (Zarr v3), resuming done shards."""
    from stages.extract import extract

    cfg = build_config(ExtractConfig, config_path, "extract", given(flags))
    click.echo(extract(cfg))
