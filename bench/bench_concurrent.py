"""100 tasks in one process, each publishing one durable event at a time.

hivebus sends the publishes that wait while a pipeline is in flight together
in the next pipeline. Three child processes run in turn, each for the same
time, so that each one's peak RSS is its own:

- ``hivebus``: 100 tasks, each looping on ``await bus.publish(...,
  durable=True)``;
- ``raw-naive``: 100 tasks, each sending its own redis-py pipeline (SET PX,
  XADD, XINFO GROUPS) per event, on a default client: what a plain client
  gets from concurrency alone;
- ``raw-batched``: one task sending pipelines of 100 events (benchmark 2's
  raw side), the reference for the target (hivebus >= 80% of it).

Every side sends bodies of the same size (about 300 bytes) to a stream with
one consumer group. Run: ``.venv/bin/python bench/bench_concurrent.py``
(about 1 minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from harness import (
    ONE_DAY_MS,
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
GROUP = "readers"
TASKS = 100
BATCH = 100
ROLES = ("hivebus", "raw-naive", "raw-batched")


async def count_for(
    workers: list[Callable[[list[int]], Awaitable[None]]],
    warmup: float,
    seconds: float,
) -> tuple[float, float]:
    """Run ``workers`` for ``warmup`` + ``seconds``; measure only the second part.

    Return events per second and this process's CPU microseconds per event.
    """
    done = [0]
    stopping = asyncio.Event()

    async def loop(worker: Callable[[list[int]], Awaitable[None]]) -> None:
        while not stopping.is_set():
            await worker(done)

    tasks = [asyncio.create_task(loop(worker)) for worker in workers]
    await asyncio.sleep(warmup)
    start, cpu_start = done[0], time.process_time()
    await asyncio.sleep(seconds)
    events, cpu = done[0] - start, time.process_time() - cpu_start
    stopping.set()
    await asyncio.gather(*tasks)
    return events / seconds, cpu / events * 1e6


async def run_hivebus(
    prefix: str, warmup: float, seconds: float
) -> tuple[float, float]:
    from workload import make_bus, order  # only here: raw children stay lean

    bus = make_bus(prefix)
    await bus.connect()
    sequence = iter(range(10**9))

    async def publish(done: list[int]) -> None:
        await bus.publish(CHANNEL, order(next(sequence)), durable=True)
        done[0] += 1

    try:
        return await count_for([publish] * TASKS, warmup, seconds)
    finally:
        await bus.stop()


async def run_raw(
    prefix: str,
    stream: str,
    body: bytes,
    warmup: float,
    seconds: float,
    *,
    batched: bool,
) -> tuple[float, float]:
    client = raw_client()
    sequence = iter(range(10**9))
    events = BATCH if batched else 1

    async def publish(done: list[int]) -> None:
        pipe = client.pipeline(transaction=False)
        for _ in range(events):
            key = f"{prefix}:event:raw-{next(sequence)}"
            pipe.set(key, body, px=ONE_DAY_MS)
            pipe.xadd(stream, {"e": body})
        pipe.xinfo_groups(stream)
        await pipe.execute(raise_on_error=False)
        done[0] += events

    workers = [publish] if batched else [publish] * TASKS
    try:
        return await count_for(workers, warmup, seconds)
    finally:
        await client.aclose()


async def child(args: argparse.Namespace) -> None:
    """Run one side in this process and print its rate and peak RSS as JSON."""
    if args.child == "hivebus":
        measured = await run_hivebus(args.prefix, args.warmup, args.seconds)
    else:
        measured = await run_raw(
            args.prefix,
            args.stream,
            args.body.encode(),
            args.warmup,
            args.seconds,
            batched=args.child == "raw-batched",
        )
    events_per_second, cpu_us = measured
    result = {"rate": events_per_second, "cpu_us": cpu_us, "rss_mib": peak_rss_mib()}
    print(json.dumps(result))


async def reset(client: aioredis.Redis, prefix: str, stream: str) -> None:
    """Drop stored events and empty the stream, keeping its group."""
    async for key in client.scan_iter(f"{prefix}:event:*", count=1000):
        await client.unlink(key)
    await client.xtrim(stream, maxlen=0)


async def main(args: argparse.Namespace) -> None:
    from workload import encoded_event, make_bus

    await print_machine()
    prefix = new_prefix("concurrent")
    bus = make_bus(prefix)
    stream = bus.keys.stream(CHANNEL)
    body = encoded_event(bus).decode()
    client = raw_client()
    results: dict[str, list[dict[str, float]]] = {role: [] for role in ROLES}
    child_timeout = args.warmup + args.seconds + 60
    try:
        await client.xgroup_create(stream, GROUP, "$", mkstream=True)
        order_of_roles = list(ROLES)
        for _ in range(args.rounds):
            for role in order_of_roles:
                command = [__file__, "--child", role, "--prefix", prefix]
                command += ["--stream", stream, "--body", body]
                command += ["--warmup", str(args.warmup)]
                command += ["--seconds", str(args.seconds)]
                result = await run_child(command, child_timeout)
                results[role].append(result)
                await reset(client, prefix, stream)
                print(f"{role}: {result}", flush=True)
            order_of_roles.reverse()
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()
    report(results, args)


def report(
    results: dict[str, list[dict[str, float]]], args: argparse.Namespace
) -> None:
    def series(role: str, field: str) -> list[float]:
        return [result[field] for result in results[role]]

    rows = [
        Row(
            f"3. {TASKS} tasks, publish one each: hivebus vs raw batched (100/pipe)",
            series("hivebus", "rate"),
            series("raw-batched", "rate"),
            "events/s",
            0.8,
        ),
        Row(
            f"3. {TASKS} tasks, publish one each: hivebus vs raw naive (1/pipe)",
            series("hivebus", "rate"),
            series("raw-naive", "rate"),
            "events/s",
        ),
    ]
    print_table(
        f"concurrent publishing: medians of {args.rounds} rounds of "
        f"{args.seconds:g}s, each side in its own process",
        rows,
    )
    cpu_rows = [
        Row(
            f"3. CPU per event, hivebus vs {role}",
            series("hivebus", "cpu_us"),
            series(role, "cpu_us"),
            "µs",
            higher_is_better=False,
        )
        for role in ("raw-batched", "raw-naive")
    ]
    print_table("publisher CPU time per event (relative is raw/hivebus)", cpu_rows)
    print("\npeak RSS of each process, MiB (median over rounds):")
    for role in ROLES:
        print(f"- {role}: {statistics.median(series(role, 'rss_mib')):.1f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="measured time per side, s"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="unmeasured start per side, s"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all sides")
    parser.add_argument(
        "--timeout", type=float, default=600, help="kill the run after this many s"
    )
    parser.add_argument("--child", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    limit_run_time(arguments.timeout)
    asyncio.run(child(arguments) if arguments.child else main(arguments))
