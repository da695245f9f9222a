"""`hdpipe distill`: wiring only; the work is `stages.distill.distill`.

Under torchrun it runs DDP: `torchrun --nproc_per_node=G -m pipeline.cli distill --config params.yaml`.
"""
from __future__ import annotations

import click

from pipeline.commands.common import build_config, config_option, config_options, given
from stages.distill import DistillConfig


@click.command("distill")
@config_option
@config_options(DistillConfig)
def command(config_path, **flags):
    """Train a student from cached teacher targets (no teacher runs) and export it for timm."""
    from stages.distill import distill

    cfg = build_config(DistillConfig, config_path, "distill", given(flags))
    click.echo(distill(cfg))
