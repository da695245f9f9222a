"""`hdpipe shard`: wiring only; the work is `stages.shard.shard`."""
from __future__ import annotations

import click

from pipeline.commands.common import build_config, config_option


@click.command("shard")
@config_option
@click.option("--input", "input", type=str, default=None,
              help="Image folder: class folders (<input>/<class>/*.JPEG, labeled) or a flat folder (unlabeled).")
@click.option("--urls", type=str, default=None,
              help="Index existing webdataset tars: a file with one URL per line, or a brace pattern "
                   "like 'data/x-{000000..000003}.tar'.")
@click.option("--sample/--no-sample", default=None,
              help="Build the bundled sample (real photos shipped with scikit-image/scikit-learn): "
                   "manifests/sample.json plus sample-probe-train/-test.json.  [default: off]")
@click.option("--name", type=str, default=None,
              help="Dataset name; tars are <name>-NNNNNN.tar.  [default: input folder name, or 'sample']")
@click.option("--out-dir", type=str, default=None,
              help="Folder (or fsspec URL) under which <name>/ holds the tars.  [default: data/shards]")
@click.option("--manifest", type=str, default=None, help="Manifest path.  [default: manifests/<name>.json]")
@click.option("--shard-size", type=int, default=None,
              help="Images per tar.  [default: 1024 for folders, 128 for --sample, as found for --urls]")
@click.option("--shuffle/--no-shuffle", default=None,
              help="Seeded shuffle of the input order (default), or sorted paths: sorted class folders make "
                   "one-class tars, and the loader can mix only a few tars per batch.  [default: shuffle]")
@click.option("--seed", type=int, default=None, help="Seed for --shuffle and the sample's crops.  [default: 0]")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default=None,
              help="A bad input file stops the run (fail) or is left out and listed in the manifest (skip).  "
                   "[default: fail]")
@click.option("--reencode", type=click.Choice(["png", "jpeg"]), default=None,
              help="Non-JPEG inputs: png = lossless (PNG/WebP kept as-is, others re-encoded to PNG); "
                   "jpeg = re-encode at --jpeg-quality. JPEGs are always stored untouched.  [default: png]")
@click.option("--jpeg-quality", type=int, default=None, help="JPEG quality 1-95 for --reencode jpeg.  [default: 95]")
@click.option("--max-image-pixels", type=int, default=None,
              help="Decompression-bomb guard: images with more pixels (width x height) are bad inputs.  "
                   "[default: 178956970]")
@click.option("--overwrite/--no-overwrite", default=None,
              help="Replace existing tars and manifests instead of refusing.  [default: no-overwrite]")
@click.option("--workers", type=int, default=None, help="Processes reading and checking images.  [default: 1]")
@click.option("--sample-train", type=int, default=None, help="--sample: unlabeled training crops.  [default: 512]")
@click.option("--sample-probe-train", type=int, default=None,
              help="--sample: labeled probe-train crops per class (10 classes).  [default: 20]")
@click.option("--sample-probe-test", type=int, default=None,
              help="--sample: labeled held-out probe-test crops per class (10 classes).  [default: 10]")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr.  [default: progress]")
def command(config_path, **flags):
    """Write images as deterministic webdataset tar shards plus a dataset manifest.

    Exactly one input: --input FOLDER, --urls LIST_OR_PATTERN, or --sample. Prints the manifest path.
    """
    from stages.shard import ShardConfig, shard

    cfg = build_config(ShardConfig, config_path, "shard", flags)
    click.echo(str(shard(cfg)))
