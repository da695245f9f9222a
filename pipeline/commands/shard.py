"""`hdpipe shard`: wiring only; the work is `stages.shard.shard`."""
from __future__ import annotations

import click

from pipeline.commands.common import build_config, config_option, config_options, given
from stages.shard import ShardConfig


@click.command("shard")
@config_option
@config_options(ShardConfig)
def command(config_path, **flags):
    """Write images as deterministic webdataset tar shards plus a dataset manifest.

    Exactly one input: --input FOLDER, --urls LIST_OR_PATTERN, or --sample. Prints the manifest path.
    """
    from stages.shard import shard

    cfg = build_config(ShardConfig, config_path, "shard", given(flags))
    click.echo(str(shard(cfg)))
