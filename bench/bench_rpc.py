"""Request and response round trips of hivebus against raw redis-py, in one run.

Both sides do the same work over Redis. The requester appends a request to
a stream and waits on one Pub/Sub reply channel that it subscribed once for
the whole process. The responder, in another process, reads the stream in a
consumer group, publishes the reply on the requester's channel and acks the
entry. Request and reply carry the same ~300-byte encoded ``Order`` event.

hivebus adds, per request: building and validating the envelope on both
sides, the stored copies of request and reply (``SET ... PX``), the
deadline check, routing by correlation id, and the durable consumer's
bookkeeping (ack, retry mover, shared metrics, trace span).

Measured, taking turns each round, and reported as medians over rounds:

- median and p99 latency of sequential requests (one in flight);
- requests per second with 50 requests in flight.

The ratio column is hivebus's share of raw's performance, computed per
round so that both sides of a ratio ran under the same machine load: for
rates hivebus/raw, for latencies raw/hivebus. The latency target "at most
1.2 times raw" is therefore a share of at least 83%.

Run: ``.venv/bin/python bench/bench_rpc.py`` (about 1 minute).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from harness import (
    REDIS_URL,
    Row,
    delete_prefix,
    limit_run_time,
    new_prefix,
    print_machine,
    print_table,
    raw_client,
)
from hivebus import Bus, Event
from workload import EVENT_TYPE, Order, encoded_event, make_bus, order

SERVICE = "bench-echo"
RAW_GROUP = "raw-echo"
IN_FLIGHT = 50
Call = Callable[[int], Awaitable[Any]]


def service_bus(prefix: str, service: str) -> Bus:
    """Return a bus of ``service`` with the ``Order`` request type registered."""
    bus = Bus(REDIS_URL, prefix=prefix, service=service)
    bus.types.register(EVENT_TYPE, Order)
    return bus


# -- responders, each in a process of its own ---------------------------------


async def serve_hivebus(prefix: str) -> None:
    """Serve ``bench.order`` requests as service ``bench-echo``, echoing them."""
    bus = service_bus(prefix, SERVICE)

    @bus.responder(EVENT_TYPE, concurrency=IN_FLIGHT)
    async def echo(request: Event[Order]) -> Order:
        return request.data

    async with bus:
        await _ready_until_stdin_closes()


async def serve_raw(prefix: str) -> None:
    """Serve raw requests: XREADGROUP a batch, then PUBLISH each reply and XACK."""
    client = raw_client()
    stream = f"{prefix}:raw:requests"
    try:
        await client.xgroup_create(stream, RAW_GROUP, "$", mkstream=True)
    except aioredis.ResponseError:
        pass  # BUSYGROUP: made by an earlier round
    reader = asyncio.create_task(_raw_loop(client, stream))
    await _ready_until_stdin_closes()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await client.aclose()


async def _raw_loop(client: aioredis.Redis, stream: str) -> None:
    while True:
        reply: Any = await client.xreadgroup(
            RAW_GROUP, "c1", {stream: ">"}, count=IN_FLIGHT, block=500
        )
        for _, rows in reply or []:
            pipe = client.pipeline(transaction=False)
            for entry_id, fields in rows:
                pipe.publish(fields[b"r"], fields[b"id"] + b" " + fields[b"e"])
                pipe.xack(stream, RAW_GROUP, entry_id)
            await pipe.execute()


async def _ready_until_stdin_closes() -> None:
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def start_responder(kind: str, prefix: str) -> subprocess.Popen[str]:
    """Start a responder process and wait until it listens."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--prefix", prefix],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.kill()
        msg = f"the {kind} responder did not start"
        raise RuntimeError(msg)
    return process


def stop_responder(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- requesters ---------------------------------------------------------------


class RawRequester:
    """XADD a request, then wait for its reply on one process-wide channel."""

    def __init__(self, prefix: str, body: bytes) -> None:
        self.client = raw_client()
        self.stream = f"{prefix}:raw:requests"
        self.reply_to = f"{prefix}:raw:reply:{secrets.token_hex(4)}"
        self.body = body
        self.pending: dict[bytes, asyncio.Future[bytes]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pubsub = self.client.pubsub()
        await pubsub.subscribe(self.reply_to)
        self._listener = asyncio.create_task(self._listen(pubsub))

    async def _listen(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
                if message is None:
                    continue
                request_id, _, body = message["data"].partition(b" ")
                future = self.pending.get(request_id)
                if future is not None and not future.done():
                    future.set_result(body)
        finally:
            await pubsub.aclose()

    async def call(self, number: int) -> bytes:
        request_id = secrets.token_hex(8).encode()
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        fields = {"id": request_id, "r": self.reply_to, "e": self.body}
        try:
            await self.client.xadd(self.stream, fields)
            return await asyncio.wait_for(future, 10)
        finally:
            del self.pending[request_id]

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self.client.aclose()


# -- measurements -------------------------------------------------------------


async def latencies(call: Call, count: int) -> list[float]:
    """Return the seconds each of ``count`` sequential calls took."""
    times = []
    for number in range(count):
        started = time.perf_counter()
        await call(number)
        times.append(time.perf_counter() - started)
    return times


async def rate(call: Call, seconds: float) -> float:
    """Return calls per second with ``IN_FLIGHT`` calls outstanding throughout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = 0

    async def worker(first: int) -> None:
        nonlocal done
        number = first
        while loop.time() < end:
            await call(number)
            number += IN_FLIGHT
            done += 1

    started = loop.time()
    await asyncio.gather(*(worker(n) for n in range(IN_FLIGHT)))
    return done / (loop.time() - started)


async def measure(call: Call, args: argparse.Namespace) -> dict[str, float]:
    await latencies(call, args.warmup)
    times = await latencies(call, args.sequential)
    return {
        "median_ms": statistics.median(times) * 1000,
        "p99_ms": statistics.quantiles(times, n=100)[98] * 1000,
        "per_second": await rate(call, args.seconds),
    }


async def bench_hivebus(args: argparse.Namespace, prefix: str) -> dict[str, float]:
    process = start_responder("hivebus", prefix)
    bus = service_bus(prefix, "bench-caller")
    try:
        async with bus:

            async def call(number: int) -> Any:
                response = await bus.request(SERVICE, EVENT_TYPE, order(number))
                assert response.order_id == f"o-{number:010d}"
                return response

            return await measure(call, args)
    finally:
        stop_responder(process)


async def bench_raw(args: argparse.Namespace, prefix: str) -> dict[str, float]:
    process = start_responder("raw", prefix)
    requester = RawRequester(prefix, encoded_event(make_bus(prefix)))
    await requester.start()
    try:
        return await measure(requester.call, args)
    finally:
        await requester.stop()
        stop_responder(process)


# -- report ---------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    await print_machine()
    prefix = new_prefix("rpc")
    rounds: dict[str, list[dict[str, float]]] = {"raw": [], "hivebus": []}
    variants = {"raw": bench_raw, "hivebus": bench_hivebus}
    turn = list(variants)
    try:
        for _ in range(args.rounds):
            for name in turn:
                rounds[name].append(await variants[name](args, prefix))
            turn.reverse()  # neither variant always runs first
    finally:
        client = raw_client()
        await delete_prefix(client, prefix)
        await client.aclose()

    def series(name: str, key: str) -> list[float]:
        return [result[key] for result in rounds[name]]

    rows = [
        Row(
            "median latency, 1 in flight",
            series("hivebus", "median_ms"),
            series("raw", "median_ms"),
            "ms",
            target=1 / 1.2,
            higher_is_better=False,
        ),
        Row(
            "p99 latency, 1 in flight",
            series("hivebus", "p99_ms"),
            series("raw", "p99_ms"),
            "ms",
            higher_is_better=False,
        ),
        Row(
            "requests/s, 50 in flight",
            series("hivebus", "per_second"),
            series("raw", "per_second"),
            "req/s",
            target=0.9,
        ),
    ]
    print_table("Request and response, hivebus against raw redis-py", rows)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="turns per variant")
    parser.add_argument(
        "--warmup", type=int, default=300, help="requests sent before timing starts"
    )
    parser.add_argument(
        "--sequential", type=int, default=2000, help="requests timed one by one"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="seconds of the 50-in-flight run"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds before the run is killed"
    )
    parser.add_argument("--serve", choices=["hivebus", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    limit_run_time(arguments.timeout)
    if arguments.serve == "hivebus":
        asyncio.run(serve_hivebus(arguments.prefix))
    elif arguments.serve == "raw":
        asyncio.run(serve_raw(arguments.prefix))
    else:
        asyncio.run(main(arguments))
