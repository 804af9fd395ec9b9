"""Durable delivery end to end: a consumer process drains a pre-published stream.

The parent adds N events (default 20,000, about 300 bytes each) to a stream,
then starts one consumer process. The consumer times itself from its start
(connect, create the group) until every entry is read, handled and acked.
It waits until its handler has seen N events, then polls XPENDING until the
group has nothing pending.

- ``hivebus``: a bus with one durable subscription at its defaults
  (``concurrency=16``, ``batch=100``; ``--concurrency`` changes the first);
  the handler counts typed events.
- ``raw``: redis-py, XREADGROUP with COUNT 100, ``json.loads`` and an async
  no-op handler per entry, then one XACK for the whole batch.

Both read the same bytes (hivebus-encoded events). Each consumer runs in its
own process, so its peak RSS is its own. Run:
``.venv/bin/python bench/bench_durable.py`` (about 1 minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from harness import (
    Row,
    delete_prefix,
    limit_run_time,
    new_prefix,
    peak_rss_mib,
    print_machine,
    print_table,
    raw_client,
    run_child,
)

CHANNEL = "orders"
GROUP = "bench"
READ_COUNT = 100
PENDING_POLL = 0.002  # seconds between XPENDING checks at the end
ACK_WAIT_LIMIT = 30.0  # seconds the last acks may take after the last handler run
ROLES = ("hivebus", "raw")


async def wait_all_acked(client: aioredis.Redis, stream: str) -> None:
    """Return once the benchmark group has no pending entry on ``stream``."""
    for _ in range(int(ACK_WAIT_LIMIT / PENDING_POLL)):
        if not (await client.xpending(stream, GROUP))["pending"]:
            return
        await asyncio.sleep(PENDING_POLL)
    msg = f"entries of {stream!r} still pending {ACK_WAIT_LIMIT}s after handling"
    raise TimeoutError(msg)


async def consume_hivebus(prefix: str, events: int, concurrency: int) -> float:
    """Drain the stream with a hivebus consumer; return the seconds it took."""
    from hivebus import Event
    from workload import Order, make_bus  # only here: the raw child stays lean

    bus = make_bus(prefix, consumer_name="bench-consumer")
    seen = [0]
    all_seen = asyncio.Event()

    @bus.subscribe(CHANNEL, durable=True, group=GROUP, concurrency=concurrency)
    async def handle(event: Event[Order]) -> None:
        seen[0] += 1
        if seen[0] == events:
            all_seen.set()

    started = time.perf_counter()
    await bus.start()
    try:
        await all_seen.wait()
        await wait_all_acked(bus.client, bus.keys.stream(CHANNEL))
        return time.perf_counter() - started
    finally:
        await bus.stop()


async def consume_raw(stream: str, events: int) -> float:
    """Drain the stream with plain redis-py; return the seconds it took."""
    seen = [0]

    async def handle(event: dict[str, Any]) -> None:
        seen[0] += 1

    started = time.perf_counter()
    client = raw_client()
    try:
        await client.xgroup_create(stream, GROUP, "0")
        while seen[0] < events:
            await read_batch(client, stream, handle)
        await wait_all_acked(client, stream)
        return time.perf_counter() - started
    finally:
        await client.aclose()


async def read_batch(
    client: aioredis.Redis,
    stream: str,
    handle: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    reply: Any = await client.xreadgroup(
        GROUP, "raw-consumer", {stream: ">"}, count=READ_COUNT, block=100
    )
    for _, rows in reply or []:
        for _, fields in rows:
            await handle(json.loads(fields[b"e"]))
        await client.xack(stream, GROUP, *(entry_id for entry_id, _ in rows))


async def child(args: argparse.Namespace) -> None:
    """Run one consumer in this process; print its time and peak RSS as JSON."""
    if args.child == "hivebus":
        seconds = await consume_hivebus(args.prefix, args.events, args.concurrency)
    else:
        seconds = await consume_raw(args.stream, args.events)
    result = {"seconds": seconds, "rss_mib": peak_rss_mib()}
    print(json.dumps(result))


async def fill(client: aioredis.Redis, stream: str, bodies: list[bytes]) -> None:
    """Add ``bodies`` to ``stream`` as entries with the event in field ``e``."""
    for start in range(0, len(bodies), 1000):
        pipe = client.pipeline(transaction=False)
        for body in bodies[start : start + 1000]:
            pipe.xadd(stream, {"e": body})
        await pipe.execute()


async def main(args: argparse.Namespace) -> None:
    from workload import encoded_event, make_bus

    await print_machine()
    prefix = new_prefix("durable")
    bus = make_bus(prefix)
    streams = {"hivebus": bus.keys.stream(CHANNEL), "raw": f"{prefix}:raw:stream"}
    bodies = [encoded_event(bus, number) for number in range(args.events)]
    client = raw_client()
    results: dict[str, list[dict[str, float]]] = {role: [] for role in ROLES}
    try:
        roles = list(ROLES)
        for _ in range(args.rounds):
            for role in roles:
                await fill(client, streams[role], bodies)
                command = [__file__, "--child", role, "--prefix", prefix]
                command += ["--stream", streams[role], "--events", str(args.events)]
                command += ["--concurrency", str(args.concurrency)]
                result = await run_child(command, args.child_timeout)
                results[role].append(result)
                await client.delete(streams[role])
                print(f"{role}: {result}", flush=True)
            roles.reverse()
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()
    report(results, args)


def report(
    results: dict[str, list[dict[str, float]]], args: argparse.Namespace
) -> None:
    def rates(role: str) -> list[float]:
        return [args.events / result["seconds"] for result in results[role]]

    row = Row(
        f"4. durable delivery of {args.events:,} pre-published events, "
        f"concurrency={args.concurrency}",
        rates("hivebus"),
        rates("raw"),
        "events/s",
        0.9,
    )
    print_table(
        f"durable delivery, consumer in its own process: medians of "
        f"{args.rounds} rounds",
        [row],
    )
    print("\npeak RSS of each consumer process, MiB (median over rounds):")
    for role in ROLES:
        rss = statistics.median(result["rss_mib"] for result in results[role])
        print(f"- {role}: {rss:.1f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, default=20_000, help="events pre-published per run"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both sides")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="the hivebus subscription's concurrency (16 is its default)",
    )
    parser.add_argument(
        "--child-timeout",
        type=float,
        default=120,
        help="kill a consumer that has not finished after this many s",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="kill the run after this many s"
    )
    parser.add_argument("--child", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    limit_run_time(arguments.timeout)
    asyncio.run(child(arguments) if arguments.child else main(arguments))
