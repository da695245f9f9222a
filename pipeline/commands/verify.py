"""`hdpipe verify STORE`: wiring only; the work is `stages.verify.verify`."""
from __future__ import annotations

import json
import sys

import click

from pipeline.commands.common import build_config, config_option, config_options, given
from stages.verify import VerifyConfig


@click.command("verify")
@click.argument("store")
@config_option
@config_options(VerifyConfig, skip=("store",))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(store, config_path, as_json, **flags):
    """Re-run STORE's teacher on random stored views; exit 1 when any array is beyond tolerance."""
    from stages.verify import format_report, verify

    cfg = build_config(VerifyConfig, config_path, "verify", {"store": store, **given(flags)})
    report = verify(cfg)
    click.echo(json.dumps(report, indent=1) if as_json else format_report(report))
    if not report["ok"]:
        # A SystemExit reaches the shell with status 1 both through pipeline.cli.main and when
        # this command is embedded in another click program.
        sys.exit(1)
