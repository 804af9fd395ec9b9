"""Publish throughput of hivebus against raw redis-py sending the same commands.

Benchmark 1 publishes one event per call with sequential awaits; benchmark 2
publishes batches of 100 with ``bus.publish_many``. The raw side sends, per
event, the commands hivebus sends (read ``hivebus/publisher.py``):

- durable: ``SET event PX ttl`` and ``XADD stream * e body`` for each event,
  then ``XINFO GROUPS stream`` once per pipeline;
- broadcast: ``SET event PX ttl`` and ``PUBLISH channel body``.

hivebus builds, validates and encodes each event. The raw side sends a body
encoded once up front, so the raw number is the cost of redis-py and Redis
alone. The durable stream has one consumer group and the broadcast channel
one subscriber (a ``redis-cli`` process), so every event is delivered and
hivebus never counts an unobserved one.

Run: ``.venv/bin/python bench/bench_publish.py`` (about 2 minutes). With
``--without-metrics-hook`` the bus skips its per-publish metrics hook, to
show what that hook costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from harness import (
    ONE_DAY_MS,
    REDIS_URL,
    Row,
    alternate,
    delete_prefix,
    limit_run_time,
    new_prefix,
    print_machine,
    print_table,
    rate,
    raw_client,
)
from hivebus import Bus, metrics
from workload import encoded_event, make_bus, order

CHANNEL = "orders"
GROUP = "readers"
BATCH = 100


@contextlib.contextmanager
def subscriber(channels: list[str], seconds: float) -> Iterator[None]:
    """Keep a ``redis-cli`` subscriber on ``channels`` for at most ``seconds``."""
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        msg = "redis-cli not found; install redis-tools so broadcasts have a listener"
        raise SystemExit(msg)
    parts = urlsplit(REDIS_URL)
    process = subprocess.Popen(
        [
            "timeout",
            str(int(seconds)),
            redis_cli,
            "-h",
            parts.hostname or "127.0.0.1",
            "-p",
            str(parts.port or 6379),
            "subscribe",
            *channels,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


async def wait_subscribed(client: aioredis.Redis, channels: list[str]) -> None:
    """Wait until each of ``channels`` has a subscriber, for at most 10 seconds."""
    async with asyncio.timeout(10):
        while True:
            counts = await client.pubsub_numsub(*channels)
            if all(count > 0 for _, count in counts):
                return
            await asyncio.sleep(0.05)


class Scene:
    """The bus, the raw client and the keys of one benchmark run."""

    def __init__(self, bus: Bus, raw: aioredis.Redis, prefix: str) -> None:
        self.bus = bus
        self.raw = raw
        self.prefix = prefix
        self.body = encoded_event(bus)
        self.hivebus_stream = bus.keys.stream(CHANNEL)
        self.raw_stream = f"{prefix}:raw:stream"
        self.raw_channel = f"{prefix}:raw:bc"
        self.sequence = 0
        self.cpu: dict[str, list[float]] = {"hivebus": [], "raw": []}

    @property
    def channels(self) -> list[str]:
        """The Pub/Sub channel names of hivebus's and raw's broadcasts."""
        return [self.bus.keys.broadcast(CHANNEL), self.raw_channel]

    async def setup(self) -> None:
        """Create both streams with a consumer group, so XINFO GROUPS finds one."""
        for stream in (self.hivebus_stream, self.raw_stream):
            await self.raw.xgroup_create(stream, GROUP, "$", mkstream=True)

    async def reset(self) -> None:
        """Drop stored events and empty the streams, keeping their groups."""
        async for key in self.raw.scan_iter(f"{self.prefix}:event:*", count=1000):
            await self.raw.unlink(key)
        for stream in (self.hivebus_stream, self.raw_stream):
            await self.raw.xtrim(stream, maxlen=0)

    def raw_key(self) -> str:
        self.sequence += 1
        return f"{self.prefix}:event:raw-{self.sequence}"

    async def raw_durable(self, events: int) -> None:
        pipe = self.raw.pipeline(transaction=False)
        for _ in range(events):
            pipe.set(self.raw_key(), self.body, px=ONE_DAY_MS)
            pipe.xadd(self.raw_stream, {"e": self.body})
        pipe.xinfo_groups(self.raw_stream)
        await pipe.execute(raise_on_error=False)

    async def raw_broadcast(self, events: int) -> None:
        pipe = self.raw.pipeline(transaction=False)
        for _ in range(events):
            pipe.set(self.raw_key(), self.body, px=ONE_DAY_MS)
            pipe.publish(self.raw_channel, self.body)
        await pipe.execute(raise_on_error=False)


def variants(
    scene: Scene, seconds: float
) -> dict[str, dict[str, Callable[[], Awaitable[float]]]]:
    """Return, per benchmark line, the hivebus and raw measurements."""
    bus = scene.bus

    def hivebus(
        operation: Callable[[int], Awaitable[object]], per_call: int = 1
    ) -> Callable[[], Awaitable[float]]:
        return measured(scene, "hivebus", operation, seconds, per_call)

    def raw(
        operation: Callable[[int], Awaitable[object]], per_call: int = 1
    ) -> Callable[[], Awaitable[float]]:
        return measured(scene, "raw", operation, seconds, per_call)

    def batch(number: int) -> list[object]:
        return [order(number * BATCH + i) for i in range(BATCH)]

    return {
        "1. publish one, durable (sequential)": {
            "hivebus": hivebus(lambda i: bus.publish(CHANNEL, order(i), durable=True)),
            "raw": raw(lambda i: scene.raw_durable(1)),
        },
        "1. publish one, broadcast (sequential)": {
            "hivebus": hivebus(lambda i: bus.publish(CHANNEL, order(i))),
            "raw": raw(lambda i: scene.raw_broadcast(1)),
        },
        "2. publish_many 100, durable": {
            "hivebus": hivebus(
                lambda i: bus.publish_many(CHANNEL, batch(i), durable=True), BATCH
            ),
            "raw": raw(lambda i: scene.raw_durable(BATCH), BATCH),
        },
        "2. publish_many 100, broadcast": {
            "hivebus": hivebus(lambda i: bus.publish_many(CHANNEL, batch(i)), BATCH),
            "raw": raw(lambda i: scene.raw_broadcast(BATCH), BATCH),
        },
    }


def measured(
    scene: Scene,
    side: str,
    operation: Callable[[int], Awaitable[object]],
    seconds: float,
    per_call: int,
) -> Callable[[], Awaitable[float]]:
    """Return a measurement of ``operation``'s events per second.

    It also appends this process's CPU time per event, in microseconds, to
    ``scene.cpu[side]``: unlike the rate, that barely moves with the load
    other processes put on the machine.
    """
    calls = [0]

    async def counted(number: int) -> object:
        calls[0] += 1
        return await operation(number)

    async def measure() -> float:
        calls[0] = 0
        started = time.process_time()
        events_per_second = await rate(counted, seconds, per_call)
        used = time.process_time() - started
        scene.cpu[side].append(used / (calls[0] * per_call) * 1e6)
        await scene.reset()
        return events_per_second

    return measure


async def main(args: argparse.Namespace) -> None:
    await print_machine()
    prefix = new_prefix("publish")
    bus = make_bus(prefix)
    raw = raw_client()
    scene = Scene(bus, raw, prefix)
    rows, cpu_rows = [], []
    try:
        await bus.connect()
        await scene.setup()
        with subscriber(scene.channels, args.timeout):
            await wait_subscribed(raw, scene.channels)
            for name, pair in variants(scene, args.seconds).items():
                if args.only and args.only not in name:
                    continue
                results = await alternate(pair, args.rounds)
                row = Row(name, results["hivebus"], results["raw"], "events/s", 0.9)
                rows.append(row)
                cpu = scene.cpu
                cpu_rows.append(
                    Row(name, cpu["hivebus"], cpu["raw"], "µs", higher_is_better=False)
                )
                scene.cpu = {"hivebus": [], "raw": []}
                print(f"{name}: {row.ratios}", flush=True)
        unobserved = bus.unobserved
    finally:
        await bus.stop()
        await delete_prefix(raw, prefix)
        await raw.aclose()
    print_table(
        f"publish throughput: medians of {args.rounds} rounds of {args.seconds:g}s "
        "per side, hivebus and raw measured back to back in each round",
        rows,
    )
    print_table(
        "client CPU time per event (this process only; relative is raw/hivebus)",
        cpu_rows,
    )
    print(f"\nevents hivebus counted as unobserved: {unobserved}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="length of one measurement, s"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds per benchmark"
    )
    parser.add_argument(
        "--only", default="", help="run only benchmarks whose name contains this"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="kill the run after this many s"
    )
    parser.add_argument(
        "--without-metrics-hook",
        action="store_true",
        help="diagnosis: skip hivebus.metrics.published, which writes the shared "
        "Redis counters after every publish",
    )
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    limit_run_time(arguments.timeout)
    if arguments.without_metrics_hook:
        metrics.published = lambda *args, **kwargs: None
    asyncio.run(main(arguments))
