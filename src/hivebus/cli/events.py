"""Commands that publish, fetch and follow events."""

from __future__ import annotations

import asyncio
import json
import math
import signal
from typing import Annotated, Any

import typer

from hivebus.bus import Bus
from hivebus.cli.common import (
    EXIT_ERROR,
    JsonOption,
    PrefixOption,
    RedisOption,
    app,
    errors,
    make_bus,
    print_event,
    run,
)
from hivebus.errors import HivebusError
from hivebus.events import Event

events_app = typer.Typer(help="Read stored events.", no_args_is_help=True)
app.add_typer(events_app, name="events")


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
        payload = json.loads(data, parse_constant=_reject_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        errors.print(
            f"error: --data is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}): {data!r}; quote it for the shell, as in "
            '--data \'{"key": "value"}\'',
            markup=False,
            highlight=False,
        )
        raise typer.Exit(EXIT_ERROR) from None
    except ValueError as exc:
        errors.print(
            f"error: --data has a number JSON cannot carry ({exc}): {data!r}; "
            "use a finite number or a string",
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
        int | None,
        typer.Option("--count", "-n", min=1, help="Exit after N events."),
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

    group = f"tail-{bus.process_id}"
    try:
        bus.subscribe(
            channel,
            durable=durable,
            raw=True,
            concurrency=1,
            group=group if durable else None,
            from_start=False,
        )(show)
    except HivebusError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_ERROR) from None

    async def go() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
        try:
            async with bus:
                errors.print(
                    f"listening on {channel!r}; Ctrl-C to stop", highlight=False
                )
                await done.wait()
        finally:
            if durable:
                await _drop_group(bus, channel, group)

    run(go)


async def _drop_group(bus: Bus, channel: str, group: str) -> None:
    """Delete the temporary consumer group of a durable tail, and its retry keys."""
    await bus.connect()
    try:
        await bus.client.xgroup_destroy(bus.keys.stream(channel), group)
        await bus.client.delete(
            bus.keys.redo(channel, group), bus.keys.retry(channel, group)
        )
    finally:
        await bus.stop()


def _reject_constant(name: str) -> None:
    """Reject NaN and Infinity, which are not JSON and would be stored as null."""
    msg = f"{name} is not a JSON number"
    raise ValueError(msg)


def _finite(text: str) -> float:
    """Parse a JSON number, rejecting ones too large for a float, such as 1e999."""
    value = float(text)
    if not math.isfinite(value):
        msg = f"{text} is too large"
        raise ValueError(msg)
    return value
