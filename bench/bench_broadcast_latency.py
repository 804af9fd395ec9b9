"""Broadcast delivery latency at a steady publish rate (default 2,000 events/s).

The listener runs in a child process and the publisher in this one, so each
event crosses two processes and Redis. Just before it publishes an event,
the publisher writes its clock (``time.monotonic_ns``, one clock for all
processes on Linux) into it. The listener's handler subtracts that from its
own clock. The first second of events is not counted.

- ``hivebus``: ``bus.publish(channel, Tick(...))`` (SET PX + PUBLISH), and a
  ``@bus.subscribe(channel)`` handler that reads the typed event.
- ``raw``: a redis-py pipeline of the same SET PX + PUBLISH, and a redis-py
  ``PubSub`` whose ``get_message`` loop runs ``json.loads`` on each message.

Both sides send about 300 bytes per event. Publishes are paced by
``asyncio.sleep`` to a fixed schedule, which on Linux wakes with about 1 ms
of granularity, so events leave in small bursts. Run:
``.venv/bin/python bench/bench_broadcast_latency.py`` (about 1 minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from harness import (
    ONE_DAY_MS,
    REDIS_URL,
    Row,
    delete_prefix,
    limit_run_time,
    new_prefix,
    peak_rss_mib,
    print_machine,
    print_table,
    raw_client,
)

CHANNEL = "ticks"
TICK_TYPE = "bench.tick"
PADDING = "p" * 100  # brings each event to about 300 bytes
STOP = -1  # the sequence number after which the listener reports
ROLES = ("hivebus", "raw")


def summarise(latencies_ns: list[int], expected: int) -> dict[str, float]:
    """Return the median, p99 and max latency in ms, and the events not seen."""
    in_ms = sorted(value / 1e6 for value in latencies_ns)
    p99 = in_ms[min(len(in_ms) - 1, int(len(in_ms) * 0.99))]
    return {
        "median_ms": statistics.median(in_ms),
        "p99_ms": p99,
        "max_ms": in_ms[-1],
        "missing": expected - len(in_ms),
        "rss_mib": peak_rss_mib(),
    }


class Recorder:
    """Collect one latency per event after the warm-up; finish on the stop mark."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.latencies: list[int] = []
        self.done = asyncio.Event()

    def record(self, sequence: int, sent_ns: int) -> None:
        if sequence == STOP:
            self.done.set()
        elif sequence >= self.skip:
            self.latencies.append(time.monotonic_ns() - sent_ns)


async def listen_hivebus(args: argparse.Namespace, recorder: Recorder) -> None:
    from pydantic import BaseModel  # only here: the raw child stays lean

    from hivebus import Bus, Event

    class Tick(BaseModel):
        seq: int
        sent_ns: int
        pad: str

    bus = Bus(REDIS_URL, prefix=args.prefix, service="bench-listener")
    bus.types.register(TICK_TYPE, Tick)

    @bus.subscribe(CHANNEL)
    async def handle(event: Event[Tick]) -> None:
        recorder.record(event.data.seq, event.data.sent_ns)

    async with bus:
        print("ready", flush=True)
        await asyncio.wait_for(recorder.done.wait(), args.seconds + 60)


async def listen_raw(args: argparse.Namespace, recorder: Recorder) -> None:
    client = raw_client()
    pubsub = client.pubsub()
    await pubsub.subscribe(args.channel)
    print("ready", flush=True)
    try:
        async with asyncio.timeout(args.seconds + 60):
            while not recorder.done.is_set():
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
                if message is not None:
                    data = json.loads(message["data"])
                    recorder.record(data["seq"], data["sent_ns"])
    finally:
        await pubsub.aclose()
        await client.aclose()


async def child(args: argparse.Namespace) -> None:
    """Listen until the stop mark, then print the latency summary as JSON."""
    recorder = Recorder(skip=int(args.rate))
    if args.child == "hivebus":
        await listen_hivebus(args, recorder)
    else:
        await listen_raw(args, recorder)
    expected = int(args.rate * args.seconds) - recorder.skip
    print(json.dumps(summarise(recorder.latencies, expected)), flush=True)


async def paced(
    publish: Callable[[int, int], Awaitable[Any]], rate: float, seconds: float
) -> None:
    """Call ``publish(sequence, now_ns)`` on a fixed schedule of ``rate`` per s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for sequence in range(int(rate * seconds)):
        delay = start + sequence / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await publish(sequence, time.monotonic_ns())
    await publish(STOP, time.monotonic_ns())


async def publish_hivebus(args: argparse.Namespace, prefix: str) -> None:
    from pydantic import BaseModel

    from hivebus import Bus

    class Tick(BaseModel):
        seq: int
        sent_ns: int
        pad: str

    bus = Bus(REDIS_URL, prefix=prefix, service="bench-publisher")
    bus.types.register(TICK_TYPE, Tick)

    async def publish(sequence: int, sent_ns: int) -> None:
        await bus.publish(CHANNEL, Tick(seq=sequence, sent_ns=sent_ns, pad=PADDING))

    await bus.connect()
    try:
        await paced(publish, args.rate, args.seconds)
    finally:
        await bus.stop()


async def publish_raw(args: argparse.Namespace, prefix: str, channel: str) -> None:
    client = raw_client()

    async def publish(sequence: int, sent_ns: int) -> None:
        body = json.dumps(
            {"specversion": "1.0", "seq": sequence, "sent_ns": sent_ns}
            | {"source": "bench-publisher", "pad": PADDING * 2}
        )
        pipe = client.pipeline(transaction=False)
        pipe.set(f"{prefix}:event:raw-{sequence}", body, px=ONE_DAY_MS)
        pipe.publish(channel, body)
        await pipe.execute()

    try:
        await paced(publish, args.rate, args.seconds)
    finally:
        await client.aclose()


async def run_side(args: argparse.Namespace, role: str, prefix: str) -> dict[str, Any]:
    """Start the listener child, publish to it, and return its summary."""
    channel = f"{prefix}:raw:bc"
    command = [__file__, "--child", role, "--prefix", prefix, "--channel", channel]
    command += ["--rate", str(args.rate), "--seconds", str(args.seconds)]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *command, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(args.seconds + 90):
            ready = await process.stdout.readline()
            if ready.strip() != b"ready":
                msg = f"{role} listener did not start: {ready!r}"
                raise RuntimeError(msg)
            if role == "hivebus":
                await publish_hivebus(args, prefix)
            else:
                await publish_raw(args, prefix, channel)
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    result: dict[str, Any] = json.loads(output.decode().strip().splitlines()[-1])
    return result


async def main(args: argparse.Namespace) -> None:
    await print_machine()
    prefix = new_prefix("latency")
    client = raw_client()
    results: dict[str, list[dict[str, Any]]] = {role: [] for role in ROLES}
    try:
        roles = list(ROLES)
        for _ in range(args.rounds):
            for role in roles:
                result = await run_side(args, role, prefix)
                results[role].append(result)
                print(f"{role}: {result}", flush=True)
                await delete_prefix(client, prefix)
            roles.reverse()
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()
    report(results, args)


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    def series(role: str, field: str) -> list[float]:
        return [float(result[field]) for result in results[role]]

    rows = [
        Row(
            f"5. broadcast latency at {args.rate:,.0f}/s, {name}",
            series("hivebus", field),
            series("raw", field),
            "ms",
            higher_is_better=False,
        )
        for name, field in (("median", "median_ms"), ("p99", "p99_ms"))
    ]
    print_table(
        f"broadcast latency, publisher and listener in two processes: medians of "
        f"{args.rounds} rounds of {args.seconds:g}s (ratio: raw/hivebus)",
        rows,
    )
    for role in ROLES:
        missing = sum(series(role, "missing"))
        rss = statistics.median(series(role, "rss_mib"))
        print(
            f"- {role}: listener peak RSS {rss:.1f} MiB, events missing {missing:.0f}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000, help="events per second")
    parser.add_argument(
        "--seconds", type=float, default=10, help="publishing time per side, s"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both sides")
    parser.add_argument(
        "--timeout", type=float, default=600, help="kill the run after this many s"
    )
    parser.add_argument("--child", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--channel", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    limit_run_time(arguments.timeout)
    asyncio.run(child(arguments) if arguments.child else main(arguments))
