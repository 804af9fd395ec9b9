"""Shared pieces of the benchmark scripts: key prefix, timing, tables, children.

Every script runs against the Redis at ``HIVEBUS_BENCH_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``), writes only keys under a prefix of its own,
deletes them at the end, and stops itself after ``--timeout`` seconds.

This module imports neither hivebus nor pydantic, so that a raw redis-py
child process that imports it has the peak RSS of a plain redis-py program.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import re
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

REDIS_URL = os.environ.get("HIVEBUS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ONE_DAY_MS = 24 * 60 * 60 * 1000


def new_prefix(name: str) -> str:
    """Return a key prefix that no other run or engineer uses."""
    return f"hbbench-{name}-{os.getpid()}-{secrets.token_hex(3)}"


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
    """Return this process's peak resident set size in MiB (VmHWM).

    ``getrusage``'s ``ru_maxrss`` would carry over the parent's RSS through
    fork and exec, so a child started by a big parent would look big too.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    msg = "no VmHWM line in /proc/self/status; peak RSS needs Linux"
    raise RuntimeError(msg)


async def rate(
    operation: Callable[[int], Awaitable[Any]], seconds: float, per_call: int = 1
) -> float:
    """Call ``operation(i)`` in turn for ``seconds``; return events per second."""
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
) -> dict[str, list[float]]:
    """Run each variant once per round and return every round's result.

    Taking turns spreads the noise of a shared machine over every variant,
    instead of letting it land on whichever runs last. The order flips every
    round, so that no variant always runs first.
    """
    results: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(rounds):
        for name in order:
            results[name].append(await variants[name]())
        order.reverse()
    return results


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a result table: hivebus against raw redis-py, per round.

    ``hivebus`` and ``raw`` hold one result per round, measured back to back,
    so each round's ratio compares the two under the same machine load.
    """

    name: str
    hivebus: list[float]
    raw: list[float]
    unit: str
    target: float | None = None
    higher_is_better: bool = True

    @property
    def ratios(self) -> list[float]:
        """hivebus's result as a share of raw's, one per round."""
        pairs = zip(self.hivebus, self.raw, strict=True)
        if self.higher_is_better:
            return [h / r for h, r in pairs]
        return [r / h for h, r in pairs]

    @property
    def ratio(self) -> float:
        """The median of the per-round ratios."""
        return statistics.median(self.ratios)

    @property
    def verdict(self) -> str:
        """``met`` or ``missed`` against the target ratio, or ``-`` without one."""
        if self.target is None:
            return "-"
        return "met" if self.ratio >= self.target else "missed"


def print_table(title: str, rows: Sequence[Row]) -> None:
    """Print ``rows`` as a Markdown table under ``title``, medians over rounds."""
    print(f"\n{title}\n")
    print(
        "| benchmark | hivebus | raw redis-py | unit | hivebus/raw "
        "(min-max) | target | result |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | --- |")
    for row in rows:
        target = f">= {row.target:.0%}" if row.target is not None else "-"
        spread = f"{min(row.ratios):.0%}-{max(row.ratios):.0%}"
        print(
            f"| {row.name} | {_number(statistics.median(row.hivebus))} "
            f"| {_number(statistics.median(row.raw))} | {row.unit} "
            f"| {row.ratio:.0%} ({spread}) | {target} | {row.verdict} |"
        )


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


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
