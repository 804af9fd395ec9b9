"""Shared pieces of the benchmark scripts: payload, key prefix, timing, tables.

Every script runs against the Redis at ``HIVEBUS_BENCH_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``), writes only keys under a prefix of its own,
deletes them at the end, and stops itself after ``--timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import re
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

from hivebus import Bus, codec

REDIS_URL = os.environ.get("HIVEBUS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
EVENT_TYPE = "bench.order"
ONE_DAY_MS = 24 * 60 * 60 * 1000


class Order(BaseModel):
    """The benchmark payload; its encoded event is about 300 bytes."""

    order_id: str
    customer: str
    sku: str
    quantity: int
    total: float
    note: str


def order(number: int) -> Order:
    """Return the payload of event ``number``."""
    return Order(
        order_id=f"o-{number:010d}",
        customer="c-1234567",
        sku="sku-abcdef",
        quantity=3,
        total=99.5,
        note="n" * 28,
    )


def new_prefix(name: str) -> str:
    """Return a key prefix that no other run or engineer uses."""
    return f"hbbench-{name}-{os.getpid()}-{secrets.token_hex(3)}"


def make_bus(prefix: str, **overrides: Any) -> Bus:
    """Return a bus on the benchmark Redis with the ``Order`` type registered."""
    bus = Bus(REDIS_URL, prefix=prefix, service="bench", **overrides)
    bus.types.register(EVENT_TYPE, Order)
    return bus


def encoded_event(bus: Bus, number: int = 0) -> bytes:
    """Return the JSON body hivebus stores for event ``number``.

    The raw redis-py variants send this same body, so both sides move the
    same bytes.
    """
    return codec.encode(bus.event(order(number)), bus.settings.max_event_bytes)


def raw_client() -> aioredis.Redis:
    """Return a redis-py client with its defaults, as a plain user would make it."""
    return aioredis.Redis.from_url(REDIS_URL)


async def delete_prefix(client: aioredis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` and return how many there were."""
    keys = [key async for key in client.scan_iter(f"{prefix}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start : start + 500])
    return len(keys)


def limit_run_time(seconds: float) -> None:
    """Kill this process with SIGALRM after ``seconds``, whatever it is doing."""
    signal.alarm(max(1, int(seconds)))


def peak_rss_mib() -> float:
    """Return this process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def rate(
    operation: Callable[[int], Awaitable[Any]], seconds: float, per_call: int = 1
) -> float:
    """Call ``operation(i)`` in sequence for ``seconds`` and return events per second."""
    loop = asyncio.get_running_loop()
    calls = 0
    start = loop.time()
    end = start + seconds
    while loop.time() < end:
        await operation(calls)
        calls += 1
    return calls * per_call / (loop.time() - start)


async def alternate(
    variants: dict[str, Callable[[], Awaitable[float]]], rounds: int
) -> dict[str, float]:
    """Run each variant once per round, in turn, and return its median result.

    Taking turns spreads the noise of a shared machine over every variant
    instead of letting it land on whichever runs last.
    """
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, measure in variants.items():
            results[name].append(await measure())
    return {name: statistics.median(values) for name, values in results.items()}


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a result table: hivebus against raw redis-py."""

    name: str
    hivebus: float
    raw: float
    unit: str
    target: float | None = None

    @property
    def ratio(self) -> float:
        """hivebus's result divided by raw's."""
        return self.hivebus / self.raw if self.raw else float("nan")

    @property
    def verdict(self) -> str:
        """``met`` or ``missed`` against the target ratio, or ``-`` without one."""
        if self.target is None:
            return "-"
        return "met" if self.ratio >= self.target else "missed"


def print_table(title: str, rows: Sequence[Row]) -> None:
    """Print ``rows`` as a Markdown table under ``title``."""
    print(f"\n{title}\n")
    print("| benchmark | hivebus | raw redis-py | unit | ratio | target | result |")
    print("| --- | ---: | ---: | --- | ---: | ---: | --- |")
    for row in rows:
        target = f">= {row.target:.0%}" if row.target is not None else "-"
        print(
            f"| {row.name} | {row.hivebus:,.0f} | {row.raw:,.0f} | {row.unit} "
            f"| {row.ratio:.0%} | {target} | {row.verdict} |"
        )


def _command_output(command: Sequence[str]) -> str:
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return ""


def _cpu_model() -> str:
    match = re.search(r"Model name:\s*(.+)", _command_output(["lscpu"]))
    return match.group(1).strip() if match else platform.processor()


def _memory_gib() -> str:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


async def print_machine() -> None:
    """Print the machine, library and server versions the numbers come from."""
    client = raw_client()
    try:
        server = await client.info("server")
    finally:
        await client.aclose()
    facts = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus (nproc)": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": _memory_gib(),
        "python": platform.python_version(),
        "redis-py": importlib.metadata.version("redis"),
        "hiredis": importlib.metadata.version("hiredis"),
        "redis server": str(server["redis_version"]),
    }
    print("; ".join(f"{name}: {value}" for name, value in facts.items()))


async def run_child(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run this Python on ``args`` and return the JSON object it prints last.

    The child is killed if it runs past ``timeout`` seconds.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        msg = f"benchmark child {list(args)!r} exited with {process.returncode}"
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result
