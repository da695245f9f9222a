"""`hdpipe evaluate`: frozen-feature k-NN and linear probe of a student or teacher (wiring only)."""
from __future__ import annotations

import json

import click

from pipeline.commands.common import build_config, config_option, config_options, given
from stages.evaluate import EvaluateConfig


@click.command("evaluate")
@config_option
@config_options(EvaluateConfig)
def command(config_path, **flags):
    """k-NN (cosine, exp(sim/T) votes) and linear-probe top-1/top-5 of a frozen model; writes DVC metrics JSON."""
    from stages.evaluate import evaluate

    cfg = build_config(EvaluateConfig, config_path, "evaluate", given(flags))
    click.echo(json.dumps(evaluate(cfg)))
