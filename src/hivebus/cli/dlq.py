"""Commands that inspect, replay and purge dead letters."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from hivebus.cli.common import (
    EXIT_USAGE,
    JsonOption,
    PrefixOption,
    RedisOption,
    app,
    console,
    errors,
    make_bus,
    parse_duration,
    run,
)

dlq_app = typer.Typer(
    help="Inspect, replay and purge dead letters.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    subscription: Annotated[
        str | None, typer.Option("--subscription", "-s", help="Only this group.")
    ] = None,
    channel: Annotated[
        str | None, typer.Option("--channel", "-c", help="Only this channel.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Most entries shown.")] = 100,
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """List dead letters, newest first."""
    bus = make_bus(redis, prefix)

    async def go() -> list[Any]:
        await bus.connect()
        try:
            return await bus.dlq.entries(
                channel=channel, subscription=subscription, limit=limit
            )
        finally:
            await bus.stop()

    entries = run(go)
    if as_json:
        for entry in entries:
            print(json.dumps(entry.to_dict()), flush=True)
        return
    table = Table("id", "subscription", "event type", "attempts", "reason")
    for entry in entries:
        table.add_row(
            entry.id,
            entry.subscription,
            entry.event_type,
            str(entry.attempts),
            entry.reason,
        )
    console.print(table)


@dlq_app.command("show")
def dlq_show(
    dead_letter_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print one dead letter with its event and error."""
    bus = make_bus(redis, prefix)

    async def go() -> Any:
        await bus.connect()
        try:
            return await bus.dlq.get(dead_letter_id)
        finally:
            await bus.stop()

    entry = run(go)
    if as_json:
        print(json.dumps(entry.to_dict(), indent=2))
        return
    for name, value in entry.to_dict().items():
        if name not in ("body", "event", "traceback"):
            console.print(f"[bold]{name}[/bold]: {value}", highlight=False)
    console.print("[bold]event[/bold]:")
    console.print_json(
        json.dumps(entry.event) if entry.event else json.dumps(entry.body)
    )
    if entry.traceback:
        console.print(f"[bold]traceback[/bold]:\n{entry.traceback}", markup=True)


@dlq_app.command("replay")
def dlq_replay(
    dead_letter_id: Annotated[str | None, typer.Argument(metavar="[ID]")] = None,
    replay_all: Annotated[
        bool, typer.Option("--all", help="Replay every dead letter.")
    ] = False,
    subscription: Annotated[
        str | None, typer.Option("--subscription", "-s", help="With --all: one group.")
    ] = None,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Deliver dead letters to their subscription again, attempts reset."""
    if (dead_letter_id is None) == (not replay_all):
        errors.print("error: give one dead-letter ID, or --all (not both)")
        raise typer.Exit(EXIT_USAGE)
    bus = make_bus(redis, prefix)

    async def go() -> int:
        await bus.connect()
        try:
            if dead_letter_id is not None:
                await bus.dlq.replay(dead_letter_id)
                return 1
            return len(await bus.dlq.replay_all(subscription=subscription))
        finally:
            await bus.stop()

    console.print(f"replayed {run(go)} dead letter(s)")


@dlq_app.command("purge")
def dlq_purge(
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than", help="Only entries older than this: 30s, 15m, 12h or 7d."
        ),
    ] = None,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Delete dead letters, all of them or those older than a duration."""
    seconds = parse_duration(older_than) if older_than else None
    bus = make_bus(redis, prefix)

    async def go() -> int:
        await bus.connect()
        try:
            return await bus.dlq.purge(older_than=seconds)
        finally:
            await bus.stop()

    console.print(f"purged {run(go)} dead letter(s)")
