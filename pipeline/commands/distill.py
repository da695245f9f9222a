"""`hdpipe distill`: wiring only; the work is `stages.distill.distill`.

Under torchrun it runs DDP: `torchrun --nproc_per_node=G -m pipeline.cli distill --config params.yaml`.
"""
from __future__ import annotations

import click

from pipeline.commands.common import build_config, config_option, parse_mapping


@click.command("distill")
@config_option
@click.option("--manifest", default=None, help="Dataset manifest the stores were extracted from.  [default: manifests/sample.json]")
@click.option("--mim-store", default=None, help="MIM teacher store URL (relations, masks).  [default: targets/mae.zarr]")
@click.option("--disc-store", default=None, help="Discriminative teacher store URL (features).  [default: targets/clip.zarr]")
@click.option("--model", default=None, help="timm ViT name of the student.  [default: vit_base_patch16_224]")
@click.option("--model-kwargs", callback=parse_mapping, default=None, metavar="MAPPING",
              help="timm.create_model arguments, YAML/JSON, e.g. '{img_size: 64, patch_size: 8, depth: 6}'.")
@click.option("--relation-layers", default=None, metavar="B,B", help="Teacher blocks (1-based) to distill, a subset of the store's.  [default: all stored]")
@click.option("--mim-target", type=click.Choice(["relations", "attention", "block_features"]), default=None,
              help="Which MIM target is distilled.  [default: relations]")
@click.option("--teachers", type=click.Choice(["hybrid", "disc_only", "mim_only"]), default=None,
              help="Loss terms: both teachers, features only, MIM only.  [default: hybrid]")
@click.option("--masking", type=click.Choice(["progressive", "direct", "random", "none"]), default=None,
              help="Tokens the student sees (random/direct/none need a --tokens all store).  [default: progressive]")
@click.option("--alpha", type=float, default=None, help="Weight α of the MIM term: loss = L_feat + α·L_rel.  [default: 1.0]")
@click.option("--smoothl1-beta", type=float, default=None, help="SmoothL1 β.  [default: 1.0]")
@click.option("--epochs", type=int, default=None, help="Epochs (paper: 300 main, 100 ablations).  [default: 2]")
@click.option("--batch-size", type=int, default=None, help="Images per device per micro-batch.  [default: 16]")
@click.option("--accum-steps", type=int, default=None, help="Micro-batches per optimizer step.  [default: 1]")
@click.option("--base-lr", type=float, default=None, help="lr = base_lr × global_batch / 1024.  [default: 6e-4]")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay.  [default: 0.05]")
@click.option("--warmup-epochs", type=float, default=None, help="Linear warmup, epochs.  [default: 1.0]")
@click.option("--clip-grad", type=float, default=None, help="Max global gradient norm (off unless given).")
@click.option("--compile/--no-compile", default=None, help="torch.compile the student.  [default: off]")
@click.option("--workers", type=int, default=None, help="DataLoader workers per rank.  [default: 2]")
@click.option("--mix-shards", type=int, default=None, help="Tar shards each loader worker shuffles together.  [default: 4]")
@click.option("--print-every", type=int, default=None, help="Optimizer steps between progress lines on stderr (0 = epoch ends).  [default: 50]")
@click.option("--seed", type=int, default=None, help="Seed for init, shuffling, view choice, random masks.  [default: 0]")
@click.option("--runs-dir", default=None, help="Parent folder of runs.  [default: runs]")
@click.option("--name", default=None, help="Run name: outputs in <runs-dir>/<name>/.  [default: hybrid]")
@click.option("--checkpoint-every", type=int, default=None, help="Optimizer steps between checkpoints (0 = epoch ends only).  [default: 200]")
@click.option("--resume/--no-resume", default=None, help="Continue from <run>/checkpoints/last.pt.  [default: off]")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.  [default: auto]")
def command(config_path, **flags):
    """Train a student from cached teacher targets (no teacher runs) and export it for timm."""
    from stages.distill import DistillConfig, distill

    cfg = build_config(DistillConfig, config_path, "distill", flags)
    click.echo(distill(cfg))
