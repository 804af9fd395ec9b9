"""Shared fixtures: a real Redis and the memory backend, with per-test key prefixes."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from hivebus import Bus

REDIS_URL = os.environ.get("HIVEBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# HIVEBUS_TEST_RUN_ID fixes the run's key prefix, so that a script can check
# what one run left on Redis.
RUN_ID = os.environ.get("HIVEBUS_TEST_RUN_ID") or (
    f"hbt-{os.getpid()}-{secrets.token_hex(3)}"
)
if not RUN_ID.startswith("hbt-"):
    msg = (
        f"invalid HIVEBUS_TEST_RUN_ID {RUN_ID!r}: it must start with 'hbt-', "
        "for example 'hbt-local-1'"
    )
    raise ValueError(msg)
_counter = 0
# Every prefix that new_prefix() returned, in order. clean_prefixes deletes
# the keys under those that the current test used.
_issued: list[str] = []
# Keys that the session guard found and deleted, for the terminal summary.
_stray_keys: list[str] = []
_guard_error: str | None = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test a timeout, so that a hang fails instead of stalling CI."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))


def new_prefix() -> str:
    """Return a key prefix used by one test only."""
    global _counter
    _counter += 1
    prefix = f"{RUN_ID}-{_counter}"
    _issued.append(prefix)
    return prefix


def delete_keys(client: redis.Redis, pattern: str) -> list[str]:
    """Delete the keys that match ``pattern`` on ``client``; return their names."""
    keys = [key.decode() for key in client.scan_iter(pattern, count=1000)]
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    return keys


@pytest.fixture(autouse=True)
def clean_prefixes() -> Iterator[None]:
    """Delete the real Redis keys under every prefix that the test used.

    pytest sets up autouse fixtures before the others of a test, so this
    teardown runs after the test's fixtures have stopped their buses and apps.
    """
    first = len(_issued)
    yield
    used = _issued[first:]
    if not used:
        return
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for prefix in used:
            delete_keys(client, f"{prefix}:*")
    except redis.ConnectionError:
        pass  # a memory-only run without Redis; the session guard reports it
    finally:
        client.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Delete every key of this run that is still on the real Redis."""
    global _guard_error
    if not _issued:
        return  # no test took a prefix, so none wrote keys of this run
    client = redis.Redis.from_url(REDIS_URL)
    try:
        _stray_keys.extend(delete_keys(client, f"{RUN_ID}*"))
    except redis.RedisError as exc:
        _guard_error = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Warn about the keys that the session guard had to delete."""
    if _guard_error is not None:
        terminalreporter.write_sep(
            "=", "leftover key check failed", yellow=True, bold=True
        )
        terminalreporter.write_line(
            f"could not scan {REDIS_URL} for keys {RUN_ID}*: {_guard_error}. "
            "Keys of this run may remain: list them with "
            f"redis-cli --scan --pattern '{RUN_ID}*' and delete them."
        )
    if not _stray_keys:
        return
    sample = ", ".join(sorted(_stray_keys)[:10])
    terminalreporter.write_sep("=", "leftover Redis keys deleted", yellow=True)
    terminalreporter.write_line(
        f"warning: {len(_stray_keys)} keys under {RUN_ID} were still on "
        f"{REDIS_URL} at the end of the run, so the session guard deleted them. "
        "A test or fixture skipped its cleanup or wrote after it. "
        f"Sample: {sample}"
    )


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
