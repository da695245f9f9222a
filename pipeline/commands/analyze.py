"""`hdpipe analyze`: attention distance, NMI, entropy and singular spectra of one or more models (wiring only)."""
from __future__ import annotations

import json

import click

from pipeline.commands.common import build_config, config_option, config_options, given
from stages.analyze import AnalyzeConfig


@click.command("analyze")
@config_option
@config_options(AnalyzeConfig, names={"models": "--model", "labels": "--label"}, multiple=("models", "labels"))
def command(config_path, **flags):
    """Per layer and head: attention distance (px), NMI, entropy; token/image singular spectra; plots overlaid."""
    from stages.analyze import analyze

    cfg = build_config(AnalyzeConfig, config_path, "analyze", given(flags))
    result = analyze(cfg)
    click.echo(json.dumps({"out_dir": result["out_dir"], "files": result["files"], "models": list(result["models"])}))
