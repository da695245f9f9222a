"""`hdpipe analyze`: attention distance, NMI, entropy and singular spectra of one or more models (wiring only)."""
from __future__ import annotations

import json

import click

from pipeline.commands.common import build_config, config_option, parse_mapping


@click.command("analyze")
@config_option
@click.option("--model", "models", multiple=True, help="Repeatable: student:runs/<name>/student or a teacher name (timm:NAME, mae, clip, ...).")
@click.option("--label", "labels", multiple=True, help="Repeatable legend names, one per --model, in order. [default: derived from the spec]")
@click.option("--checkpoint", default=None, help="Teacher only (needs exactly one teacher --model): local weights file.")
@click.option("--random-init/--no-random-init", default=None, help="Teachers only: random weights (students keep theirs).")
@click.option("--model-kwargs", default=None, callback=parse_mapping, metavar="MAPPING", help="Teachers only: constructor overrides, YAML/JSON, e.g. '{img_size: 64}'.")
@click.option("--manifest", default=None, help="Images to analyze. [default: manifests/sample-probe-test.json]")
@click.option("--num-images", type=int, default=None, help="First N images of the manifest. [default: 64]")
@click.option("--layers", default=None, help="1-based blocks, e.g. '1,6,12'. [default: every block]")
@click.option("--pooling", type=click.Choice(["cls", "mean"]), default=None, help="Image-level spectrum embedding. [default: mean]")
@click.option("--crop-pct", type=float, default=None, help="Center view crop fraction. [default: 0.875]")
@click.option("--interpolation", type=click.Choice(["bicubic", "bilinear", "nearest", "lanczos"]), default=None, help="Center view resize filter. [default: bicubic]")
@click.option("--batch-size", type=int, default=None, help="Images per forward. [default: 16]")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N. [default: auto]")
@click.option("--out-dir", default=None, help="Folder for analysis.json, PNGs and DVC CSVs. [default: reports/analyze]")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr. [default: on]")
def command(config_path, models, labels, model_kwargs, **flags):
    """Per layer and head: attention distance (px), NMI, entropy; token/image singular spectra; plots overlaid."""
    from stages.analyze import AnalyzeConfig, analyze

    flags["models"] = models or None  # click gives () when not given: keep the file's value
    flags["labels"] = labels or None
    flags["model_kwargs"] = model_kwargs
    cfg = build_config(AnalyzeConfig, config_path, "analyze", flags)
    result = analyze(cfg)
    click.echo(json.dumps({"out_dir": result["out_dir"], "files": result["files"], "models": list(result["models"])}))
