"""`hdpipe extract`: wiring only; the work is `stages.extract.extract`."""
from __future__ import annotations

import click

from pipeline.commands.common import build_config, config_option, parse_mapping


@click.command("extract")
@config_option
@click.option("--manifest", default=None, help="Dataset manifest written by `hdpipe shard`.  [default: manifests/sample.json]")
@click.option("--teacher", default=None, help="mae | clip | deit | dino | timm:NAME | open_clip:NAME[:TAG].  [default: mae]")
@click.option("--role", type=click.Choice(["auto", "mim", "disc"]), default=None,
              help="mim: relations + masks; disc: features for the MIM store's views; auto: from the teacher table.")
@click.option("--checkpoint", default=None, help="Local weights (.pth/.bin/.safetensors) for offline sites.")
@click.option("--random-init/--no-random-init", default=None, help="Random weights from a fixed seed (demos, tests).")
@click.option("--model-kwargs", callback=parse_mapping, default=None, metavar="MAPPING",
              help="Model constructor arguments, YAML/JSON, e.g. '{img_size: 64, patch_size: 8, depth: 6}'.")
@click.option("--targets", default=None, help="Folder or fsspec URL of the stores (<targets>/<name>.zarr).  [default: targets]")
@click.option("--name", default=None, help="Store name (default: the teacher name).")
@click.option("--out", default=None, help="Full store URL; overrides --targets/--name.")
@click.option("--mim-store", default=None, help="Disc teachers: MIM store to read views and masks from.  [default: <targets>/mae.zarr]")
@click.option("--views", type=int, default=None, help="Views (crops) per image.  [default: 1; disc: the MIM store's]")
@click.option("--seed", type=int, default=None, help="View-plan seed.  [default: 0; disc: the MIM store's]")
@click.option("--scale", default=None, metavar="MIN,MAX", help="RandomResizedCrop area range, fraction of the image.  [default: 0.2,1.0; disc: the MIM store's]")
@click.option("--ratio", default=None, metavar="MIN,MAX", help="RandomResizedCrop aspect range (w/h).  [default: 0.75,1.333; disc: the MIM store's]")
@click.option("--hflip/--no-hflip", default=None, help="Horizontal flip with p=0.5.  [default: on; disc: the MIM store's]")
@click.option("--relation-layers", default=None, metavar="B,B",
              help="1-based blocks for Q·Kᵀ; <= 0 counts back from the last block L (0 = L).  [default: -2,-1 = L-2,L-1]")
@click.option("--extra-targets", default=None, metavar="NAMES", help="MIM extras: attention, block_features (comma-separated).")
@click.option("--mask-ratio", type=float, default=None, help="K, fraction of kept tokens dropped at layers 0, L/3, 2L/3.  [default: 0.3]")
@click.option("--tokens", type=click.Choice(["auto", "kept", "all"]), default=None,
              help="Token set stored: [CLS]+kept or all tokens (auto: kept for MIM, the MIM store's for disc).")
@click.option("--precision", default=None, help="fp16 | int8 | q1pct (compact, <= 1%% relative error per view).  [default: fp16]")
@click.option("--batch-size", type=int, default=None, help="Views per teacher forward.  [default: 64]")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--workers", type=int, default=None, help="Start a dask LocalCluster with N worker processes (0 = in-process).  [default: 0]")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Use a running dask scheduler (tcp://host:8786).")
@click.option("--retries", type=int, default=None, help="dask retries per shard task.  [default: 2]")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default=None,
              help="Unreadable image in a shard: stop, or store valid=false and list it in the done marker.  [default: fail]")
@click.option("--overwrite/--no-overwrite", default=None, help="Delete and rebuild a store built with other settings.")
@click.option("--progress/--no-progress", default=None, help="Progress bar and summary on stderr.  [default: on]")
def command(config_path, **flags):
    """Run a frozen teacher once per view and store its targets (Zarr v3), resuming done shards."""
    from stages.extract import ExtractConfig, extract

    cfg = build_config(ExtractConfig, config_path, "extract", flags)
    click.echo(extract(cfg))
