"""Commands that show the error context kept by the error handler service."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from hivebus.cli.common import (
    JsonOption,
    PrefixOption,
    RedisOption,
    app,
    console,
    make_bus,
    run,
)
from hivebus.error_handler import ErrorContext, ErrorSummary

errors_app = typer.Typer(
    help="Show failure counts and recent failures recorded by the error handler.",
    no_args_is_help=True,
)
app.add_typer(errors_app, name="errors")


@errors_app.command("show")
def errors_show(
    limit: Annotated[
        int, typer.Option("--limit", min=0, help="Recent failures shown.")
    ] = 20,
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print failure counts by event type, subscription, error type and source."""
    bus = make_bus(redis, prefix)

    async def go() -> ErrorSummary:
        await bus.connect()
        try:
            return await ErrorContext(bus.client, bus.keys).read(limit=limit)
        finally:
            await bus.stop()

    summary = run(go)
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    console.print(f"[bold]failures recorded[/bold]: {summary.total}", highlight=False)
    sections = (
        ("event type", summary.by_event_type),
        ("subscription", summary.by_subscription),
        ("error type", summary.by_error_type),
        ("source", summary.by_source),
    )
    for title, counts in sections:
        if not counts:
            continue
        table = Table(title, "failures")
        for name, count in counts.items():
            table.add_row(name, str(count))
        console.print(table)
    if summary.recent:
        table = Table("time", "subscription", "event id", "error", "dead letter")
        for record in summary.recent:
            error = f"{record.error_type}: {record.error}"[:80]
            table.add_row(
                record.time,
                record.subscription,
                record.event_id,
                error,
                record.dead_letter_id,
            )
        console.print(table)
