"""Redis going away: restarts, kills, empty restarts, outages, eviction, clock skew.

Tests that restart or reconfigure Redis run a private redis-server on ports
6390-6393 (see ``tests/redis_server.py``). The rest use keys under their own
prefix on the shared test server.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from hivebus import (
    Bus,
    ConfigError,
    DeadLetter,
    Delivery,
    Event,
    EventNotFoundError,
    RedisUnavailableError,
    RetryPolicy,
)
from tests.conftest import REDIS_URL, delete_prefix, eventually, new_prefix
from tests.redis_server import private_redis

PORT_RESTART = 6390
PORT_EMPTY = 6391
PORT_EVICTION = 6392
PORT_OUTAGE = 6393
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
ATTEMPT = re.compile(r"attempt=(\d+)")


@asynccontextmanager
async def running(*buses: Bus) -> AsyncIterator[None]:
    """Start ``buses`` for the block and always stop them after it."""
    try:
        for bus in buses:
            await bus.start()
        yield
    finally:
        for bus in buses:
            await bus.stop(drain_timeout=2)


async def numsub(client: Any, name: str) -> int:
    """Return PUBSUB NUMSUB of one Pub/Sub channel."""
    counts = dict(await client.pubsub_numsub(name))
    return int(counts.get(name.encode(), 0))


def records_since(
    caplog: pytest.LogCaptureFixture, start: int, logger: str, level: int
) -> list[logging.LogRecord]:
    """Return the records of ``logger`` at ``level`` logged after index ``start``."""
    return [
        r for r in caplog.records[start:] if r.name == logger and r.levelno == level
    ]


def assert_one_line_per_step(records: list[logging.LogRecord], steps: int) -> None:
    """Check that error lines count up their attempt, one line per backoff step."""
    messages = [r.getMessage() for r in records]
    matches = [ATTEMPT.search(message) for message in messages]
    assert None not in matches, messages
    attempts = [int(match.group(1)) for match in matches if match is not None]
    assert attempts == list(range(attempts[0], attempts[0] + len(attempts)))
    assert len(records) <= steps


def unhandled_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return log lines of failed background tasks and unretrieved exceptions."""
    return [
        r.getMessage()
        for r in caplog.records
        if "background task failed" in r.getMessage()
        or "never retrieved" in r.getMessage()
    ]


# -- broadcast across a restart and a kill ----------------------------------


class StatusFeed:
    """A listener bus that records each status event's name, and its publisher."""

    def __init__(self, url: str) -> None:
        prefix = new_prefix()
        self.listener = Bus(url, prefix=prefix, service="listener")
        self.publisher = Bus(url, prefix=prefix, service="publisher")
        self.seen: list[str] = []
        self.ids: dict[str, str] = {}
        self.channel = self.listener.keys.broadcast("status")

        @self.listener.subscribe("status", raw=True)
        async def on_status(event: Event[Any]) -> None:
            self.seen.append(event.data["name"])

    async def publish(self, *names: str, spacing: float = 0.0) -> None:
        for name in names:
            result = await self.publisher.publish(
                "status", {"name": name}, type="status", raw=True
            )
            self.ids[name] = result.event_id
            if spacing:
                await asyncio.sleep(spacing)

    async def wait_seen(self, names: list[str], timeout: float = 5) -> None:
        await eventually(
            lambda: set(names) <= set(self.seen),
            timeout=timeout,
            what=f"{names[0]}..{names[-1]} handled",
        )


def names(first: int, last: int) -> list[str]:
    return [f"s{n:02d}" for n in range(first, last + 1)]


async def at(moment: float) -> None:
    """Sleep until the event loop's clock reaches ``moment``."""
    await asyncio.sleep(max(0.0, moment - asyncio.get_running_loop().time()))


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_broadcast_survives_redis_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broadcast listener resubscribes after Redis restarts with its data.

    Redis is down for 3 s. s06-s10 go out from restart + 1 s at 200 ms
    spacing, while the listener may still be backing off, so they are only
    required to be stored. s11-s15 go out at restart + 6 s, which is sooner
    than a 10 s wait but keeps its meaning. The listener must be back within
    5 s, because its reconnect delay is capped at 2 s, so + 6 s is past any
    reconnect. The listener runs in this process, so "same process, no
    unhandled exception" means its task still runs and no background task
    failed. The publisher is a separate bus.
    """
    with private_redis(PORT_RESTART) as server:
        feed = StatusFeed(server.url)
        probe = aioredis.Redis.from_url(server.url)
        async with running(feed.listener, feed.publisher):
            await feed.publish(*names(1, 5))
            await feed.wait_seen(names(1, 5))

            await asyncio.to_thread(server.shutdown, save=True)
            loop = asyncio.get_running_loop()
            down_at, cpu_at, log_at = (
                loop.time(),
                time.process_time(),
                len(caplog.records),
            )
            await eventually(
                lambda: feed.listener.health()["status"] == "degraded",
                timeout=2,
                what="degraded health while Redis is down",
            )
            await at(down_at + 3)
            cpu_share = (time.process_time() - cpu_at) / (loop.time() - down_at)
            outage_errors = records_since(
                caplog, log_at, "hivebus.broadcast", logging.ERROR
            )

            await asyncio.to_thread(server.start)
            restart_at = loop.time()
            during = asyncio.create_task(
                _publish_at(feed, restart_at + 1, names(6, 10), spacing=0.2)
            )
            await eventually(
                lambda: _numsub_is(probe, feed.channel, 1),
                timeout=5,
                what="NUMSUB back to 1 within 5 s of the restart",
            )
            await during
            await _publish_at(feed, restart_at + 6, names(11, 15))
            await feed.wait_seen(names(11, 15))
            stored = {
                name: (await feed.publisher.get_event(feed.ids[name])).id
                for name in names(6, 10)
            }
            health = feed.listener.health()
        await probe.aclose()

    assert len(outage_errors) >= 1
    assert_one_line_per_step(outage_errors, steps=8)
    assert cpu_share < 0.2
    for name in names(11, 15):
        assert feed.seen.count(name) == 1, name
    assert stored == {name: feed.ids[name] for name in names(6, 10)}
    assert health["parts"]["broadcast"] == "healthy"
    assert unhandled_errors(caplog) == []


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_broadcast_survives_client_kill(caplog: pytest.LogCaptureFixture) -> None:
    """A broadcast listener resubscribes after ``CLIENT KILL TYPE pubsub``.

    s16-s20 go out during the first second after the kill, and they are only
    required to be stored. s21-s25 go out at kill + 5 s and must each be
    handled once.
    """
    with private_redis(PORT_RESTART, *NO_PERSISTENCE) as server:
        feed = StatusFeed(server.url)
        probe = aioredis.Redis.from_url(server.url)
        async with running(feed.listener, feed.publisher):
            await feed.publish("s00")
            await feed.wait_seen(["s00"])

            killed = await probe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            kill_at = asyncio.get_running_loop().time()
            await feed.publish(*names(16, 20), spacing=0.2)
            await eventually(
                lambda: _numsub_is(probe, feed.channel, 1),
                timeout=5,
                what="NUMSUB back to 1 within 5 s of the kill",
            )
            await _publish_at(feed, kill_at + 5, names(21, 25))
            await feed.wait_seen(names(21, 25))
            stored = {
                name: (await feed.publisher.get_event(feed.ids[name])).id
                for name in names(16, 20)
            }
            reconnects = feed.listener.health()
        await probe.aclose()

    assert killed == 1
    for name in names(21, 25):
        assert feed.seen.count(name) == 1, name
    assert stored == {name: feed.ids[name] for name in names(16, 20)}
    assert reconnects["parts"]["broadcast"] == "healthy"
    assert unhandled_errors(caplog) == []


async def _publish_at(
    feed: StatusFeed, moment: float, batch: list[str], spacing: float = 0.0
) -> None:
    await at(moment)
    await feed.publish(*batch, spacing=spacing)


async def _numsub_is(client: Any, name: str, expected: int) -> bool:
    try:
        return await numsub(client, name) == expected
    except redis_errors.ConnectionError:
        return False


# -- durable consumer after Redis comes back empty --------------------------


class WorkQueue:
    """A worker bus with one durable subscription, and a publisher bus."""

    def __init__(self, url: str) -> None:
        prefix = new_prefix()
        self.worker = Bus(url, prefix=prefix, service="worker")
        self.publisher = Bus(url, prefix=prefix, service="publisher")
        self.handled: list[int] = []

        @self.worker.subscribe("work", durable=True, raw=True)
        async def on_work(event: Event[Any]) -> None:
            self.handled.append(event.data["n"])

    async def publish(self, numbers: range) -> None:
        for n in numbers:
            await self.publisher.publish(
                "work", {"n": n}, type="work", raw=True, durable=True
            )

    async def wait_handled(self, numbers: range, timeout: float = 15) -> None:
        await eventually(
            lambda: set(numbers) <= set(self.handled),
            timeout=timeout,
            what=f"events {numbers.start}..{numbers.stop - 1} handled",
        )


def group_missing_warnings(
    caplog: pytest.LogCaptureFixture, start: int
) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records[start:]
        if r.levelno == logging.WARNING and "consumer group missing" in r.getMessage()
    ]


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_consumer_recovers_empty_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A durable consumer recreates its group when Redis restarts empty."""
    with private_redis(PORT_EMPTY, *NO_PERSISTENCE) as server:
        queue = WorkQueue(server.url)
        async with running(queue.worker, queue.publisher):
            await queue.publish(range(10))
            await queue.wait_handled(range(10))
            healthy_before = queue.worker.health()["status"]

            await asyncio.to_thread(server.shutdown, save=False)
            loop = asyncio.get_running_loop()
            down_at, cpu_at, log_at = (
                loop.time(),
                time.process_time(),
                len(caplog.records),
            )
            await eventually(
                lambda: queue.worker.health()["status"] == "degraded",
                timeout=2,
                what="degraded health while Redis is down",
            )
            await at(down_at + 2)
            health_down = queue.worker.health()["status"]
            cpu_share = (time.process_time() - cpu_at) / (loop.time() - down_at)
            outage_errors = [
                r
                for r in caplog.records[log_at:]
                if r.levelno == logging.ERROR and r.name.startswith("hivebus")
            ]

            await asyncio.to_thread(server.start)
            await at(loop.time() + 3)
            published_at = loop.time()
            await queue.publish(range(10, 20))
            await queue.wait_handled(range(10, 20), timeout=15)
            recovery = loop.time() - published_at
            client = aioredis.Redis.from_url(server.url)
            groups = await client.xinfo_groups(queue.worker.keys.stream("work"))
            await client.aclose()
            health_after = queue.worker.health()["status"]

    warnings = group_missing_warnings(caplog, log_at)
    assert healthy_before == "healthy"
    assert health_down == "degraded"
    assert cpu_share < 0.2
    assert_one_line_per_step(outage_errors, steps=6)
    assert recovery < 15
    assert [g["name"] for g in groups] == [b"worker"]
    assert len(warnings) >= 1
    assert "subscription=work/worker" in warnings[0].getMessage()
    assert "NOGROUP" in warnings[0].getMessage()
    assert health_after == "healthy"
    assert unhandled_errors(caplog) == []


async def test_consumer_recovers_deleted_stream(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A durable consumer recreates its group after the stream key is deleted."""
    worker = make_bus(service="worker")
    handled: list[int] = []

    @worker.subscribe("work", durable=True, raw=True)
    async def on_work(event: Event[Any]) -> None:
        handled.append(event.data["n"])

    async with worker:
        for n in range(10):
            await worker.publish("work", {"n": n}, type="work", raw=True, durable=True)
        await eventually(lambda: len(handled) == 10, what="first 10 handled")
        log_at = len(caplog.records)
        deleted = await worker.client.delete(worker.keys.stream("work"))
        for n in range(10, 20):
            await worker.publish("work", {"n": n}, type="work", raw=True, durable=True)
        await eventually(
            lambda: set(range(10, 20)) <= set(handled),
            timeout=15,
            what="10 events after the delete handled",
        )
        groups = await worker.client.xinfo_groups(worker.keys.stream("work"))

    warnings = group_missing_warnings(caplog, log_at)
    assert deleted == 1
    assert sorted(handled) == list(range(20))
    assert [g["name"] for g in groups] == [b"worker"]
    assert len(warnings) >= 1
    assert "subscription=work/worker" in warnings[0].getMessage()


# -- publishing while Redis is down ------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_publish_during_outage_raises() -> None:
    """A publish retries for `publish_timeout`, then raises with the cause."""
    with private_redis(PORT_OUTAGE, *NO_PERSISTENCE) as server:
        bus = Bus(server.url, prefix=new_prefix(), publish_timeout=1.5)
        async with running(bus):
            await bus.publish("orders", {"n": 0}, type="probe", raw=True)
            await asyncio.to_thread(server.shutdown, save=False)

            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(RedisUnavailableError) as info:
                await bus.publish("orders", {"n": 1}, type="probe", raw=True)
            elapsed = loop.time() - started
            health = bus.health()

    assert 1.5 <= elapsed < 2.5
    assert isinstance(info.value.__cause__, redis_errors.ConnectionError)
    assert "Redis stayed unreachable for 1.5s" in str(info.value)
    assert "check that the server is up, or raise `publish_timeout`" in str(info.value)
    assert health["status"] == "degraded"
    assert health["parts"]["publisher"] == "degraded"


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_queued_publish_keeps_its_deadline() -> None:
    """A publish queued behind a batch that waits for Redis keeps its own deadline."""
    with private_redis(PORT_OUTAGE, *NO_PERSISTENCE) as server:
        bus = Bus(server.url, prefix=new_prefix(), publish_timeout=1.5)
        async with running(bus):
            await bus.publish("orders", {"n": 0}, type="probe", raw=True)
            await asyncio.to_thread(server.shutdown, save=False)

            first = asyncio.create_task(_timed_publish(bus, 1))
            await asyncio.sleep(0.5)  # the second publish queues behind the first
            second = asyncio.create_task(_timed_publish(bus, 2))
            outcomes = await asyncio.gather(first, second)

    for error, elapsed in outcomes:
        assert isinstance(error, RedisUnavailableError)
        assert 1.4 <= elapsed < 2.5


async def _timed_publish(bus: Bus, n: int) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        await bus.publish("orders", {"n": n}, type="probe", raw=True)
    except RedisUnavailableError as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_publish_resumes_after_restart() -> None:
    """A publish issued while Redis is down succeeds once Redis is back in time."""
    with private_redis(PORT_OUTAGE, *NO_PERSISTENCE) as server:
        bus = Bus(server.url, prefix=new_prefix(), publish_timeout=6)
        async with running(bus):
            await bus.publish("orders", {"n": 0}, type="probe", raw=True)
            await asyncio.to_thread(server.shutdown, save=False)

            loop = asyncio.get_running_loop()
            started = loop.time()
            pending = asyncio.create_task(
                bus.publish("orders", {"n": 1}, type="probe", raw=True)
            )
            await asyncio.sleep(1.5)  # the outage the publish has to outlast
            still_waiting = not pending.done()
            await asyncio.to_thread(server.start)
            result = await pending
            elapsed = loop.time() - started
            stored = await bus.get_event(result.event_id)
            health = bus.health()

    assert still_waiting
    assert elapsed < 6
    assert stored.data == {"n": 1}
    assert health["status"] == "healthy"


# -- memory-pressure eviction ------------------------------------------------


EVICTION = ("--maxmemory", "16mb", "--maxmemory-policy", "volatile-lru")


async def test_eviction_policy_warned_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with private_redis(PORT_EVICTION, *NO_PERSISTENCE, *EVICTION) as server:
        bus = Bus(server.url, prefix=new_prefix())
        async with running(bus):
            pass
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "hivebus.connection"
    ]
    assert len(warnings) == 1
    assert "'volatile-lru'" in warnings[0]
    assert "'noeviction'" in warnings[0]


async def test_eviction_policy_refused_when_asked() -> None:
    with private_redis(PORT_EVICTION, *NO_PERSISTENCE, *EVICTION) as server:
        bus = Bus(server.url, prefix=new_prefix(), maxmemory_policy_action="refuse")
        with pytest.raises(ConfigError, match="'volatile-lru'") as info:
            await bus.start()
        await bus.stop()
    assert "set it to 'noeviction'" in str(info.value)


@pytest.mark.timeout(90)
async def test_evicted_events_still_delivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Durable delivery does not need the stored event, which eviction may remove.

    20 durable events go out with no consumer running. Broadcast events of
    4 KB then fill the 16 MB server until the 20 stored events are evicted
    (at least one; the LRU is approximate). A worker started after that
    still gets all 20 with their
    data, because each stream entry carries the whole event; 4 of them are
    dead-lettered on purpose. Streams, the retry set, the dead-letter stream
    and the channel set have no TTL, so the policy cannot evict them.
    """
    with private_redis(PORT_EVICTION, *NO_PERSISTENCE, *EVICTION) as server:
        prefix = new_prefix()
        publisher = Bus(server.url, prefix=prefix, service="publisher")
        worker = Bus(server.url, prefix=prefix, service="worker")
        handled: dict[int, Any] = {}

        @worker.subscribe("work", durable=True, raw=True)
        async def on_work(event: Event[Any]) -> None:
            if event.data["poison"]:
                raise DeadLetter("poison event, as the test intends")
            handled[event.data["n"]] = event.data

        client = aioredis.Redis.from_url(server.url)
        async with running(publisher):
            sent = await publisher.publish_many(
                "work",
                [{"n": n, "poison": n % 5 == 0} for n in range(20)],
                type="work",
                raw=True,
                durable=True,
            )
            stored_keys = [publisher.keys.event(r.event_id) for r in sent]
            gone = await _fill_until_evicted(publisher, client, stored_keys)
            evicted = int((await client.info("stats"))["evicted_keys"])
            missing = sent[gone[0]].event_id
            with pytest.raises(EventNotFoundError) as info:
                await publisher.get_event(missing)

            async with running(worker):
                await eventually(lambda: len(handled) == 16, what="16 good events")
                await eventually(
                    lambda: worker.dlq.count("work"), what="dead letters stored"
                )
                dead_letters = await worker.dlq.count("work")
                keys = worker.keys
                ttls = {
                    key: await client.ttl(key)
                    for key in (
                        keys.stream("work"),
                        keys.redo("work", "worker"),
                        keys.dlq("work"),
                        keys.channels,
                    )
                }
                groups = await client.xinfo_groups(keys.stream("work"))
        await client.aclose()

    assert gone
    assert evicted > 0
    assert f"no stored event {missing!r}" in str(info.value)
    assert "Redis evicted it" in str(info.value)
    assert handled == {n: {"n": n, "poison": False} for n in range(20) if n % 5 != 0}
    assert dead_letters == 4
    assert ttls == dict.fromkeys(ttls, -1)
    assert [g["name"] for g in groups] == [b"worker"]
    assert unhandled_errors(caplog) == []


async def _fill_until_evicted(
    bus: Bus, client: Any, keys: list[str], max_batches: int = 120
) -> list[int]:
    """Publish 4 KB broadcast events until ``keys`` are evicted; return the gone ones.

    Redis's LRU is approximate (it samples a few keys per eviction), so a few
    of ``keys`` may outlive many batches. Filling stops once all are gone, or
    after ``max_batches`` if at least one is gone.
    """
    blob = "x" * 4096
    for _ in range(max_batches):
        await bus.publish_many(
            "filler", [{"blob": blob}] * 500, type="filler", raw=True
        )
        if await client.exists(*keys) == 0:
            break
    gone = [index for index, key in enumerate(keys) if not await client.exists(key)]
    if not gone:
        raise AssertionError(f"no stored event evicted after {max_batches} batches")
    return gone


# -- host clock skew ---------------------------------------------------------


SKEW = 120.0  # seconds this process's wall clock runs ahead of Redis


@pytest.fixture
def skewed_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    """Put this process's ``time.time`` ``SKEW`` seconds ahead of the real clock."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + SKEW)
    return SKEW


async def redis_ms(client: Any) -> int:
    """Return the Redis server's clock in milliseconds."""
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.fixture
async def shared(prefix: str) -> AsyncIterator[Callable[..., Bus]]:
    """A factory of buses on the shared test server; keys are deleted at the end."""
    buses: list[Bus] = []

    def factory(**overrides: Any) -> Bus:
        bus = Bus(REDIS_URL, prefix=prefix, service="svc", **overrides)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.stop(drain_timeout=2)
    client = aioredis.Redis.from_url(REDIS_URL)
    await delete_prefix(client, prefix)
    await client.aclose()


@pytest.mark.timeout(30)
async def test_skewed_clock_keeps_retry_backoff(
    shared: Callable[..., Bus], skewed_clock: float, raw_redis: Any
) -> None:
    """A retry is due its backoff after the failure on Redis's clock, not the host's."""
    bus = shared()
    attempts: list[int] = []
    failed_at: list[int] = []

    @bus.subscribe(
        "work",
        durable=True,
        raw=True,
        retry=RetryPolicy(max_attempts=3, base=2, cap=10, jitter="none"),
    )
    async def on_work(event: Event[Any], delivery: Delivery) -> None:
        attempts.append(await redis_ms(raw_redis))
        if delivery.attempt == 1:
            failed_at.append(await redis_ms(raw_redis))
            raise ValueError("fails once, as the test intends")

    async with bus:
        await bus.publish("work", {"n": 1}, type="work", raw=True, durable=True)
        retry_set = bus.keys.retry("work", "svc")
        await eventually(
            lambda: raw_redis.zcard(retry_set), timeout=5, what="retry scheduled"
        )
        scores = await raw_redis.zrange(retry_set, 0, -1, withscores=True)
        await eventually(lambda: len(attempts) == 2, timeout=10, what="attempt 2")

    due_ms = int(scores[0][1])
    assert 1_900 <= due_ms - failed_at[0] <= 2_500
    assert 2_000 <= attempts[1] - failed_at[0] <= 3_000


@pytest.mark.timeout(30)
async def test_skewed_clock_trims_nothing_young(
    shared: Callable[..., Bus], skewed_clock: float, raw_redis: Any
) -> None:
    """Trimming measures age on Redis's clock, so a fast host trims nothing early.

    Retention is 11 minutes and the stream holds entries from 12, 10, 5 and
    0 minutes ago. On a host clock 2 minutes fast the 10-minute entry would
    look 12 minutes old; only the 12-minute entry may go.
    """
    bus = shared(stream_retention=660)
    handled: list[str] = []

    @bus.subscribe("work", durable=True, raw=True)
    async def on_work(event: Event[Any]) -> None:
        handled.append(event.id)

    stream = bus.keys.stream("work")
    now_ms = await redis_ms(raw_redis)
    old_ids = [f"{now_ms - minutes * 60_000}-0" for minutes in (12, 10, 5)]
    for entry_id in old_ids:
        await raw_redis.xadd(stream, {"x": "old"}, id=entry_id)
    async with bus:
        # The consumer trims once as it starts, before it reads anything.
        await bus.publish("work", {"n": 1}, type="work", raw=True, durable=True)
        await eventually(lambda: handled, what="new event handled")
        await eventually(
            lambda: _nothing_pending(raw_redis, stream), what="old entries settled"
        )
        removed_again = await bus.consumers[0].trim()
        kept = [_text(entry_id) for entry_id, _ in await raw_redis.xrange(stream)]

    assert kept[:2] == old_ids[1:]
    assert len(kept) == 3
    assert removed_again == 0


async def test_skewed_clock_keeps_event_ttl(
    shared: Callable[..., Bus], skewed_clock: float, raw_redis: Any
) -> None:
    """A stored event's TTL is set on the server: one day, whatever the host clock."""
    bus = shared()
    async with bus:
        result = await bus.publish("status", {"n": 1}, type="status", raw=True)
        ttl = await raw_redis.ttl(bus.keys.event(result.event_id))
    assert 86_390 <= ttl <= 86_400


async def _nothing_pending(client: Any, stream: str) -> bool:
    summary = await client.xpending(stream, "svc")
    return bool(summary["pending"] == 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
