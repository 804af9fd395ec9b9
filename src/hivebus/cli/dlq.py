"""Commands that inspect, replay and purge dead letters."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from hivebus.bus import Bus
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
from hivebus.dlq import DeadLetterEntry

T = TypeVar("T")

dlq_app = typer.Typer(
    help="Inspect, replay and purge dead letters.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")

SubscriptionOption = Annotated[
    str | None,
    typer.Option(
        "--subscription",
        "-s",
        help="Only this subscription: a group name, or CHANNEL/GROUP.",
    ),
]
ChannelOption = Annotated[
    str | None, typer.Option("--channel", "-c", help="Only this channel.")
]


def _with_bus(redis: str, prefix: str, action: Callable[[Bus], Awaitable[T]]) -> T:
    """Connect a bus, run ``action`` on it, and disconnect."""
    bus = make_bus(redis, prefix)

    async def go() -> T:
        await bus.connect()
        try:
            return await action(bus)
        finally:
            await bus.stop()

    return run(go)


@dlq_app.command("list")
def dlq_list(
    subscription: SubscriptionOption = None,
    channel: ChannelOption = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Most entries shown.")
    ] = 100,
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """List dead letters, newest first (one JSON object per line with --json)."""
    entries = _with_bus(
        redis,
        prefix,
        lambda bus: bus.dlq.entries(
            channel=channel, subscription=subscription, limit=limit
        ),
    )
    if as_json:
        for entry in entries:
            print(json.dumps(entry.to_dict()), flush=True)
        return
    if not entries:
        console.print("no dead letters", highlight=False)
        return
    table = Table()
    table.add_column("id", no_wrap=True)
    table.add_column("subscription", no_wrap=True)
    table.add_column("event type")
    table.add_column("attempts", justify="right")
    table.add_column("failed (UTC)")
    table.add_column("reason")
    for entry in entries:
        table.add_row(
            entry.id,
            f"{entry.channel}/{entry.subscription}",
            entry.event_type,
            str(entry.attempts),
            _time(entry.last_failure_ms),
            entry.reason[:80],
        )
    console.print(table)


@dlq_app.command("show")
def dlq_show(
    dead_letter_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print one dead letter with its event, error and traceback."""
    entry = _with_bus(redis, prefix, lambda bus: bus.dlq.get(dead_letter_id))
    if as_json:
        print(json.dumps(entry.to_dict(), indent=2))
        return
    _print_entry(entry)


def _print_entry(entry: DeadLetterEntry) -> None:
    shown = entry.to_dict()
    for name in ("id", "channel", "subscription", "reason", "error_type", "error"):
        console.print(f"{name}: {shown[name]}", markup=False, highlight=False)
    console.print(f"attempts: {entry.attempts}", markup=False, highlight=False)
    for name in ("first_failure", "last_failure"):
        console.print(f"{name}: {shown[name]}", markup=False, highlight=False)
    for name in ("event_id", "event_type", "source", "origin_id"):
        console.print(f"{name}: {shown[name] or '-'}", markup=False, highlight=False)
    console.print("event:", markup=False)
    if entry.event is not None:
        console.print_json(json.dumps(entry.event))
    else:
        console.print(entry.body, markup=False, highlight=False)
    if entry.traceback:
        console.print(f"traceback:\n{entry.traceback}", markup=False, highlight=False)


@dlq_app.command("replay")
def dlq_replay(
    dead_letter_id: Annotated[str | None, typer.Argument(metavar="[ID]")] = None,
    replay_all: Annotated[
        bool,
        typer.Option(
            "--all", help="Replay every dead letter, in original publish order."
        ),
    ] = False,
    subscription: SubscriptionOption = None,
    channel: ChannelOption = None,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Deliver dead letters to their subscription again, with attempts reset.

    Each event keeps its id. A dead letter is removed only once its
    re-delivery is stored.
    """
    if (dead_letter_id is None) == (not replay_all):
        errors.print(
            "error: give one dead-letter ID, or --all (not both); "
            "`hivebus dlq list` prints the ids",
            markup=False,
        )
        raise typer.Exit(EXIT_USAGE)
    if dead_letter_id is not None and (subscription or channel):
        errors.print(
            "error: --subscription and --channel only apply with --all", markup=False
        )
        raise typer.Exit(EXIT_USAGE)

    async def replay(bus: Bus) -> list[DeadLetterEntry]:
        if dead_letter_id is not None:
            return [await bus.dlq.replay(dead_letter_id)]
        return await bus.dlq.replay_all(channel=channel, subscription=subscription)

    replayed = _with_bus(redis, prefix, replay)
    for entry in replayed:
        console.print(
            f"replayed {entry.id} event_id={entry.event_id or '-'} "
            f"subscription={entry.channel}/{entry.subscription}",
            markup=False,
            highlight=False,
        )
    console.print(f"replayed {len(replayed)} dead letter(s)", highlight=False)


@dlq_app.command("purge")
def dlq_purge(
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            help="Only entries dead-lettered longer ago than this: 30s, 15m, 12h "
            "or 7d.",
        ),
    ] = None,
    subscription: SubscriptionOption = None,
    channel: ChannelOption = None,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Delete dead letters: all of them, or those older than a duration."""
    seconds = parse_duration(older_than) if older_than is not None else None
    removed = _with_bus(
        redis,
        prefix,
        lambda bus: bus.dlq.purge(
            older_than=seconds, channel=channel, subscription=subscription
        ),
    )
    console.print(f"purged {removed} dead letter(s)", highlight=False)


def _time(ms: int) -> str:
    if ms <= 0:
        return "-"
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")
