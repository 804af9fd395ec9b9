"""Shared fixtures: a real Redis and the memory backend, with per-test key prefixes."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from hivebus import Bus

REDIS_URL = os.environ.get("HIVEBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = f"hbt-{os.getpid()}-{secrets.token_hex(3)}"
_counter = 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test a timeout, so that a hang fails instead of stalling CI."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))


def new_prefix() -> str:
    """Return a key prefix used by one test only."""
    global _counter
    _counter += 1
    return f"{RUN_ID}-{_counter}"


@pytest.fixture(params=["redis", "memory"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend-independent test runs on a real Redis and on memory://."""
    return str(request.param)


@pytest.fixture
def prefix() -> str:
    return new_prefix()


@pytest.fixture
def url(backend: str, prefix: str) -> str:
    if backend == "memory":
        return f"memory://{prefix}"
    return REDIS_URL


@pytest.fixture
async def raw_redis() -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the real test server."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


async def delete_prefix(client: Any, prefix: str) -> None:
    """Delete every key under ``prefix``."""
    keys = [key async for key in client.scan_iter(f"{prefix}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start : start + 500])


@pytest.fixture
async def make_bus(url: str, prefix: str) -> AsyncIterator[Callable[..., Bus]]:
    """A factory of buses on the test's backend and prefix; all stop at the end."""
    buses: list[Bus] = []

    def factory(**overrides: Any) -> Bus:
        options: dict[str, Any] = {"prefix": prefix, "service": "svc"}
        options.update(overrides)
        bus = Bus(url, **options)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.stop(drain_timeout=2)
    cleaner = Bus(url, prefix=prefix)
    await cleaner.connect()
    await delete_prefix(cleaner.client, prefix)
    await cleaner.stop()


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll ``check`` until it is true, or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)
