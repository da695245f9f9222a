"""The `hdpipe` command: a thin click layer over the stage functions.

Every command follows one pattern: parse flags, merge them over its `params.yaml` section
(`--config FILE`), build the stage's typed config, call the stage function. Commands live in
`pipeline/commands/<name>.py`, one per stage; heavy imports (torch, timm) happen inside them so
`hdpipe --help` stays fast.

User errors (`HdpipeError`, and an OSError saying the disk is full, over quota or read-only)
print as one line and exit with status 2; `hdpipe --debug ...` shows the traceback.
"""
from __future__ import annotations

import importlib
import sys

import click

from pipeline import __version__
from pipeline.errors import HdpipeError, storage_error

# (module under pipeline.commands, command name, one-line help) for every command; a module defines
# `command`. The help is repeated here so that `hdpipe --help` imports no stage (torch, timm):
# tests/test_cli.py checks it against each command's own docstring.
COMMANDS = (
    ("shard", "shard", "Write images as deterministic webdataset tar shards plus a dataset manifest."),
    ("extract", "extract", "Run a frozen teacher once per view and store its targets (Zarr v3), resuming..."),
    ("inspect_store", "inspect", "Show a target store's schema, teacher, counts, shards done/missing/damaged,..."),
    ("verify", "verify", "Re-run STORE's teacher on random stored views; exit 1 when any array is beyond..."),
    ("distill", "distill", "Train a student from cached teacher targets (no teacher runs) and export it..."),
    ("evaluate", "evaluate", "k-NN (cosine, exp(sim/T) votes) and linear-probe top-1/top-5 of a frozen..."),
    ("analyze", "analyze", "Per layer and head: attention distance (px), NMI, entropy; token/image singular..."),
)


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs or its own help is shown."""

    def list_commands(self, ctx):
        return [name for _, name, _ in COMMANDS]

    def get_command(self, ctx, name):
        for module, cmd, _ in COMMANDS:
            if cmd == name:
                return importlib.import_module(f"pipeline.commands.{module}").command
        return None

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for _, name, short in COMMANDS])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="hdpipe")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Cached-teacher Hybrid Distillation: shard images, extract teacher targets once, distill students.

    Each command reads its section of a params file with --config (e.g. `params.yaml`);
    flags given on the command line override it.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 ok, 2 user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        # Without standalone mode click returns a command's `ctx.exit(n)` status instead of exiting.
        status = cli.main(args=argv, prog_name="hdpipe", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("hdpipe: aborted", err=True)
        return 1
    except HdpipeError as e:
        if debug:
            raise
        click.echo(f"hdpipe: error: {e}", err=True)
        return 2
    except OSError as e:  # a full, over-quota or read-only disk is the user's to fix, wherever it struck
        refused = storage_error(e)
        if refused is None or debug:
            raise
        click.echo(f"hdpipe: error: {refused}", err=True)
        return 2
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
