"""The ``hivebus`` command line.

Every option can also be set by an environment variable named in its help
(``HIVEBUS_REDIS_URL`` and so on). Exit codes are the constants below.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from hivebus import __version__
from hivebus.bus import Bus
from hivebus.config import Settings
from hivebus.errors import HivebusError
from hivebus.events import Event

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1  # the command failed: bad input, a missing id, Redis unreachable
EXIT_USAGE = 2  # the command line itself is wrong (typer's own code)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C, as shells report SIGINT

app = typer.Typer(
    name="hivebus",
    help="An event bus on Redis for teams of services and AI agents.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
events_app = typer.Typer(help="Read stored events.", no_args_is_help=True)
dlq_app = typer.Typer(
    help="Inspect, replay and purge dead letters.", no_args_is_help=True
)
app.add_typer(events_app, name="events")
app.add_typer(dlq_app, name="dlq")

console = Console()
errors = Console(stderr=True)

RedisOption = Annotated[
    str,
    typer.Option(
        "--redis",
        envvar="HIVEBUS_REDIS_URL",
        help="Redis URL: redis://, rediss:// (TLS) or memory:// (in-process).",
    ),
]
PrefixOption = Annotated[
    str,
    typer.Option(
        "--prefix", envvar="HIVEBUS_PREFIX", help="Namespace put in front of every key."
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON instead of a table.")
]


def _version(value: bool) -> None:
    if value:
        console.print(f"hivebus {__version__} (Python {sys.version.split()[0]})")
        raise typer.Exit(EXIT_OK)


@app.callback()
def main_options(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, help="Log more: -v for INFO, -vv for DEBUG."
        ),
    ] = 0,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Set up logging for every command."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(
        level=level,
        format="%(name)s %(message)s",
        handlers=[RichHandler(console=errors, show_path=False)],
    )


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning hivebus errors into a message and exit code 1."""
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except HivebusError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


def make_bus(redis: str, prefix: str, **overrides: Any) -> Bus:
    """Build a bus from the common options."""
    try:
        settings = Settings(redis_url=redis, prefix=prefix, **overrides)
    except ValueError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    return Bus(settings=settings)


def print_event(event: Event[Any], as_json: bool) -> None:
    """Print one event as a JSON line or a readable block."""
    if as_json:
        print(event.model_dump_json(exclude_none=True), flush=True)
        return
    console.print(
        f"[bold]{event.type}[/bold] id={event.id} source={event.source} "
        f"time={event.time.isoformat()}",
        highlight=False,
    )
    console.print_json(json.dumps(event.model_dump(mode="json")["data"]))


@app.command()
def publish(
    channel: Annotated[str, typer.Argument(help="Channel to publish on.")],
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="Event type.")],
    data: Annotated[
        str, typer.Option("--data", "-d", help="Event data as a JSON document.")
    ] = "{}",
    durable: Annotated[
        bool, typer.Option("--durable", help="Append to the channel's stream.")
    ] = False,
    subject: Annotated[
        str | None, typer.Option("--subject", help="CloudEvents subject.")
    ] = None,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Publish one event and print its id."""
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        errors.print(
            f"error: --data is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}): {data!r}; quote it for the shell, as in "
            '--data \'{"key": "value"}\'',
            markup=False,
            highlight=False,
        )
        raise typer.Exit(EXIT_ERROR) from None
    bus = make_bus(redis, prefix)

    async def go() -> None:
        try:
            result = await bus.publish(
                channel,
                payload,
                type=event_type,
                raw=True,
                durable=durable,
                subject=subject,
            )
        finally:
            await bus.stop()
        print(result.event_id)
        if not result.delivered:
            errors.print(
                f"note: no listener or consumer group received it on {channel!r}; "
                "it is stored and can be fetched with `hivebus events get`",
                markup=False,
                highlight=False,
            )

    run(go)


@events_app.command("get")
def events_get(
    event_id: Annotated[str, typer.Argument(metavar="ID", help="Event id.")],
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print a stored event."""
    bus = make_bus(redis, prefix)

    async def go() -> Event[Any]:
        try:
            return await bus.get_event(event_id)
        finally:
            await bus.stop()

    print_event(run(go), as_json)


@app.command()
def tail(
    channel: Annotated[
        str, typer.Argument(help="Channel or pattern, such as 'orders.*'.")
    ],
    count: Annotated[
        int | None, typer.Option("--count", "-n", help="Exit after N events.")
    ] = None,
    durable: Annotated[
        bool,
        typer.Option(
            "--durable",
            help="Read the channel's stream from now on instead of Pub/Sub.",
        ),
    ] = False,
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print events on a channel as they arrive."""
    bus = make_bus(redis, prefix, service="hivebus-tail")
    seen = 0
    done = asyncio.Event()

    async def show(event: Event[Any]) -> None:
        nonlocal seen
        if count is not None and seen >= count:
            return
        seen += 1
        print_event(event, as_json)
        if count is not None and seen >= count:
            done.set()

    bus.subscribe(
        channel,
        durable=durable,
        raw=True,
        concurrency=1,
        group=f"tail-{bus.process_id}" if durable else None,
        from_start=False,
    )(show)

    async def go() -> None:
        async with bus:
            errors.print(f"listening on {channel!r}; Ctrl-C to stop", highlight=False)
            await done.wait()
        if durable:
            await _drop_group(bus, channel, f"tail-{bus.process_id}")

    run(go)


async def _drop_group(bus: Bus, channel: str, group: str) -> None:
    await bus.connect()
    try:
        await bus.client.xgroup_destroy(bus.keys.stream(channel), group)
    finally:
        await bus.stop()


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


def parse_duration(text: str) -> float:
    """Return the seconds in ``30s``, ``15m``, ``12h`` or ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.replace(".", "", 1).isdigit():
        errors.print(
            f"error: invalid duration {text!r}: use a number and a unit, as in 30s, "
            "15m, 12h or 7d",
            markup=False,
        )
        raise typer.Exit(EXIT_USAGE)
    return float(number) * units[unit]


def main() -> None:
    """Run the command line."""
    app()


@app.command()
def demo(redis: RedisOption = "memory://") -> None:
    """Run a short tour of the bus: publish, retry, dead letter and replay."""
    from hivebus.demo import tour

    run(lambda: tour(redis, console))
