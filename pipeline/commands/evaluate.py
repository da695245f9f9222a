"""`hdpipe evaluate`: frozen-feature k-NN and linear probe of a student or teacher (wiring only)."""
from __future__ import annotations

import json

import click

from pipeline.commands.common import build_config, config_option, parse_mapping


@click.command("evaluate")
@config_option
@click.option("--model", default=None, help="student:runs/<name>/student, or a teacher: mae, clip, deit, dino, timm:NAME, open_clip:NAME[:TAG].")
@click.option("--checkpoint", default=None, help="Teacher only: local weights file instead of the hub's pretrained tag.")
@click.option("--random-init/--no-random-init", default=None, help="Teacher only: random weights (a baseline).")
@click.option("--model-kwargs", default=None, callback=parse_mapping, metavar="MAPPING", help="Teacher only: constructor overrides, YAML/JSON, e.g. '{img_size: 64}'.")
@click.option("--train-manifest", default=None, help="Labeled manifest the probes are fit on. [default: manifests/sample-probe-train.json]")
@click.option("--test-manifest", default=None, help="Labeled manifest accuracy is measured on. [default: manifests/sample-probe-test.json]")
@click.option("--pooling", type=click.Choice(["cls", "mean"]), default=None, help="Image embedding: CLS token or mean of patch tokens. [default: cls]")
@click.option("--k", "k", type=int, default=None, help="k-NN neighbours. [default: 20]")
@click.option("--temperature", type=float, default=None, help="k-NN vote weight exp(cos/T). [default: 0.07]")
@click.option("--linear-weight-decay", type=float, default=None, help="Linear probe L2 λ: mean CE + λ/2·|W|². [default: 1e-4]")
@click.option("--linear-max-iter", type=int, default=None, help="Linear probe L-BFGS iterations. [default: 500]")
@click.option("--crop-pct", type=float, default=None, help="Center view: resize shorter side to img_size/crop_pct, crop img_size². [default: 0.875]")
@click.option("--interpolation", type=click.Choice(["bicubic", "bilinear", "nearest", "lanczos"]), default=None, help="Center view resize filter. [default: bicubic]")
@click.option("--batch-size", type=int, default=None, help="Images per forward. [default: 64]")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N. [default: auto]")
@click.option("--out", default=None, help="Metrics JSON path. [default: reports/evaluate/<model>.json]")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr. [default: on]")
def command(config_path, model_kwargs, **flags):
    """k-NN (cosine, exp(sim/T) votes) and linear-probe top-1/top-5 of a frozen model; writes DVC metrics JSON."""
    from stages.evaluate import EvaluateConfig, evaluate

    flags["model_kwargs"] = model_kwargs
    cfg = build_config(EvaluateConfig, config_path, "evaluate", flags)
    metrics = evaluate(cfg)
    click.echo(json.dumps(metrics))
