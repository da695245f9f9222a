"""`hdpipe verify STORE`: wiring only; the work is `stages.verify.verify`."""
from __future__ import annotations

import json
import sys

import click

from pipeline.commands.common import build_config, config_option


@click.command("verify")
@click.argument("store")
@config_option
@click.option("--samples", type=int, default=None, help="Random stored views to re-run.  [default: 16]")
@click.option("--seed", type=int, default=None, help="Seed of the draw of views.  [default: 0]")
@click.option("--manifest", default=None, help="Dataset manifest (default: the one recorded beside the store).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--batch-size", type=int, default=None, help="Views per teacher forward.  [default: 32]")
@click.option("--tolerance", type=float, default=None,
              help="Max per-view relative error (default: by the store's precision: fp16 5e-3, int8 2e-2, q1pct 1.2e-2).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(store, config_path, as_json, **flags):
    """Re-run STORE's teacher on random stored views; exit 1 when any array is beyond tolerance."""
    from stages.verify import VerifyConfig, format_report, verify

    cfg = build_config(VerifyConfig, config_path, "verify", {"store": store, **flags})
    report = verify(cfg)
    click.echo(json.dumps(report, indent=1) if as_json else format_report(report))
    if not report["ok"]:
        # A SystemExit reaches the shell with status 1 both through pipeline.cli.main and when
        # this command is embedded in another click program.
        sys.exit(1)
