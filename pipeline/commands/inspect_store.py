"""`hdpipe inspect STORE`: wiring only; the work is `stages.inspect_store.inspect_store`."""
from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of a table.")
@click.option("--content", is_flag=True, help="Read every chunk of every done shard and check its crc32c "
              "(a full read of the store; without it damaged shards are found by file lengths only).")
def command(store: str, as_json: bool, content: bool) -> None:
    """Show a target store's schema, teacher, counts, shards done/missing/damaged, bytes per view,
    error vs fp32 and provenance. STORE is a local path or any fsspec URL. Exits 1 when a shard is
    damaged."""
    from stages.inspect_store import format_info, inspect_store

    info = inspect_store(store, content=content)
    click.echo(json.dumps(info, indent=2, sort_keys=True) if as_json else format_info(info))
    if info["damaged"]["shards"]:
        click.get_current_context().exit(1)
