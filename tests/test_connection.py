"""Connections: error translation, reconnect backoff, and no pool leaks on cancel."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from hivebus import Bus, Event, RedisUnavailableError
from hivebus.connection import Backoff, retry_transient, translate
from hivebus.errors import ConsumerGroupMissingError
from tests.conftest import REDIS_URL, delete_prefix, eventually
from tests.redis_server import port_is_open

CLOSED_PORT = 6394  # one of the private test ports, never started in this file
# Connections a started bus may keep open besides its pool's idle ones: the
# broadcast listener's Pub/Sub connection, and a connection of the publisher
# if it keeps one of its own.
MAX_LONG_LIVED = 2


@pytest.fixture
def closed_url() -> str:
    """A URL on a private port that nothing listens on."""
    if port_is_open(CLOSED_PORT):
        pytest.fail(f"port {CLOSED_PORT} should be closed but accepts connections")
    return f"redis://127.0.0.1:{CLOSED_PORT}/0"


async def test_connect_to_closed_port_raises(closed_url: str) -> None:
    bus = Bus(closed_url, publish_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        await bus.publish("orders", {"n": 1}, type="probe", raw=True)
    elapsed = time.monotonic() - started

    assert isinstance(info.value.__cause__, redis_errors.ConnectionError)
    assert f"127.0.0.1:{CLOSED_PORT}" in str(info.value)
    assert "check that the server is up" in str(info.value)
    assert elapsed >= 0.5
    assert elapsed < 3.0


async def test_retry_transient_gives_up_at_deadline(closed_url: str) -> None:
    client = aioredis.Redis.from_url(closed_url)
    attempts = 0

    async def ping() -> Any:
        nonlocal attempts
        attempts += 1
        return await client.ping()

    started = time.monotonic()
    try:
        with pytest.raises(RedisUnavailableError, match="publish_timeout") as info:
            await retry_transient(ping, deadline=1.0, what="ping")
    finally:
        await client.aclose()
    elapsed = time.monotonic() - started

    assert isinstance(info.value.__cause__, redis_errors.ConnectionError)
    assert str(info.value).startswith("ping failed: Redis stayed unreachable")
    assert 1.0 <= elapsed < 2.0
    assert attempts >= 3


async def test_retry_transient_counts_elapsed_time(closed_url: str) -> None:
    client = aioredis.Redis.from_url(closed_url)
    started = time.monotonic()
    try:
        with pytest.raises(RedisUnavailableError):
            await retry_transient(client.ping, deadline=5.0, elapsed=5.0, what="ping")
    finally:
        await client.aclose()
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    ("reply", "expected_type", "hint"),
    [
        ("NOGROUP No such key", ConsumerGroupMissingError, "recreates it"),
        ("OOM command not allowed", RedisUnavailableError, "`maxmemory`"),
        ("NOPERM no permissions", RedisUnavailableError, "access to the hivebus"),
        ("ERR something else", RedisUnavailableError, "server log"),
    ],
)
def test_translate_reply_names_fix(
    reply: str, expected_type: type[Exception], hint: str
) -> None:
    error = translate(redis_errors.ResponseError(reply), "publish")
    assert type(error) is expected_type
    assert str(error).startswith("publish: ")
    assert reply in str(error)
    assert hint in str(error)


def test_translate_connection_error() -> None:
    error = translate(redis_errors.ConnectionError("refused"), "publish")
    assert type(error) is RedisUnavailableError
    assert "`redis_url`" in str(error)


def test_backoff_doubles_to_cap() -> None:
    backoff = Backoff(base=0.1, cap=1.0)
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 0.1


async def client_count(client: Any, name: str) -> int:
    """Return how many connections Redis has open with client name ``name``."""
    return sum(1 for c in await client.client_list() if c.get("name") == name)


@pytest.mark.timeout(90)
async def test_cancellations_leak_no_connections(
    raw_redis: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled listens and publishes give every pooled connection back.

    A bus with a bounded pool of 20 starts 200 tasks that each open a
    temporary listener and cancels each after 0-50 ms, while 200 publishes
    are cancelled after 0-5 ms. Once the pool's idle connections are closed,
    CLIENT LIST shows only the bus's long-lived connections, and 100 publishes
    still go through.
    """
    bus = Bus(
        REDIS_URL,
        prefix=prefix,
        service="svc",
        consumer_name=f"{prefix}-leak",
        max_connections=20,
    )
    client_name = f"hivebus:svc:{prefix}-leak"
    seen: list[str] = []

    @bus.subscribe("status", raw=True)
    async def on_status(event: Event[Any]) -> None:
        seen.append(event.id)

    baseline = await client_count(raw_redis, client_name)
    outcomes: list[str] = []

    async def listen_briefly(n: int) -> None:
        async with bus.listen(f"temp.{n}", raw=True):
            await asyncio.sleep(1)

    async def cancel_after(coro: Any, seconds: float) -> None:
        task = asyncio.create_task(coro)
        await asyncio.sleep(seconds)
        task.cancel()
        try:
            await task
            outcomes.append("done")
        except asyncio.CancelledError:
            outcomes.append("cancelled")
        except Exception as exc:
            outcomes.append(repr(exc))

    try:
        await bus.start()
        await bus.publish("status", {"n": -1}, type="status", raw=True)
        async with bus.listen("warm-up", raw=True):
            pass
        pool = bus.client.connection_pool
        long_lived = await _settled_count(raw_redis, client_name, pool)
        in_use_before = in_use(pool)
        for batch in range(20):
            await asyncio.gather(
                *(
                    cancel_after(
                        listen_briefly(batch * 10 + i), random.uniform(0, 0.05)
                    )
                    for i in range(10)
                ),
                *(
                    cancel_after(
                        bus.publish("status", {"n": i}, type="status", raw=True),
                        random.uniform(0, 0.005),
                    )
                    for i in range(10)
                ),
            )

        await eventually(
            lambda: _count_is(raw_redis, client_name, pool, long_lived),
            timeout=5,
            what="only the long-lived connections left open",
        )
        await eventually(
            lambda: in_use(pool) == in_use_before,
            timeout=5,
            what="pool back to its long-lived checked-out connections",
        )
        temp_counts = dict(
            await raw_redis.pubsub_numsub(
                *(bus.keys.broadcast(f"temp.{n}") for n in range(200))
            )
        )

        started = time.monotonic()
        durations = []
        for i in range(100):
            begin = time.monotonic()
            await bus.publish("status", {"n": i}, type="status", raw=True)
            durations.append(time.monotonic() - begin)
        follow_up_seconds = time.monotonic() - started
        await eventually(lambda: len(seen) >= 100, what="follow-up events handled")
    finally:
        await bus.stop(drain_timeout=2)
        await delete_prefix(raw_redis, prefix)
    gc.collect()

    assert 1 <= long_lived - baseline <= MAX_LONG_LIVED
    assert in_use_before <= MAX_LONG_LIVED
    assert len(outcomes) == 400
    assert set(outcomes) <= {"done", "cancelled"}
    assert set(temp_counts.values()) == {0}
    assert max(durations) < 1.0
    assert follow_up_seconds < 10
    never_retrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert never_retrieved == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def in_use(pool: Any) -> int:
    """Return how many of the pool's connections are checked out."""
    counts = {
        attrs.get("db.client.connection.state"): n
        for n, attrs in pool.get_connection_count()
    }
    return int(counts["used"])


async def _open_besides_idle(client: Any, name: str, pool: Any) -> int:
    """Close the pool's idle connections, then count the ones still open.

    Background writers (metrics, counters) may open an idle connection again
    at any time, so callers poll this rather than read it once.
    """
    await pool.disconnect(inuse_connections=False)
    return await client_count(client, name)


async def _count_is(client: Any, name: str, pool: Any, expected: int) -> bool:
    return await _open_besides_idle(client, name, pool) == expected


async def _settled_count(client: Any, name: str, pool: Any) -> int:
    """Return the count of open connections once three polls in a row agree."""
    counts: list[int] = []
    for _ in range(50):
        counts.append(await _open_besides_idle(client, name, pool))
        if len(counts) >= 3 and len(set(counts[-3:])) == 1:
            return counts[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"connection count for {name!r} did not settle: {counts}")
