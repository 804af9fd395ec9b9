"""Circuit breakers shared through Redis: opening, one probe, closing, consumers."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from hivebus import (
    BreakerConfig,
    BreakerOpenError,
    Bus,
    CircuitBreaker,
    Delivery,
    Event,
)
from hivebus.bus import BREAKER_CHANGED_TYPE, BREAKER_CHANNEL
from tests.conftest import REDIS_URL, delete_prefix, eventually, new_prefix

FAST = BreakerConfig(failure_threshold=3, window=30.0, cooldown=0.3)


async def fail() -> None:
    raise ConnectionError("dependency down")


async def succeed() -> str:
    return "ok"


async def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.config.failure_threshold):
        with pytest.raises(ConnectionError):
            await breaker.call(fail)


async def wait_half_open_due(breaker: CircuitBreaker) -> None:
    async def due() -> bool:
        return (await breaker.peek()).verdict == "probe"

    await eventually(due, timeout=10, what=f"cool-down of {breaker.name}")


async def state_of(breaker: CircuitBreaker) -> str:
    return (await breaker.state()).state


# -- opening -----------------------------------------------------------------


async def test_closed_breaker_passes_calls(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        breaker = bus.breaker("dep", FAST)
        result = await breaker.call(succeed)
        state = await breaker.state()

    assert result == "ok"
    assert state.state == "closed"
    assert state.calls == 1
    assert state.failures == 0


async def test_opens_after_threshold_failures(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        breaker = bus.breaker("dep", FAST)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await breaker.call(fail)
        before = await breaker.state()
        with pytest.raises(ConnectionError):
            await breaker.call(fail)
        after = await breaker.state()

    assert before.state == "closed"
    assert before.failures == 2
    assert after.state == "open"


async def test_open_breaker_rejects_without_calling(make_bus: Any) -> None:
    bus = make_bus()
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    async with bus:
        breaker = bus.breaker("dep", BreakerConfig(failure_threshold=1, cooldown=30))
        with pytest.raises(ConnectionError):
            await breaker.call(fail)
        with pytest.raises(BreakerOpenError, match="'dep' is open") as caught:
            await breaker.call(counted)

    assert calls == 0
    assert 29.0 < caught.value.retry_after <= 30.0


async def test_failure_rate_opens(make_bus: Any) -> None:
    config = BreakerConfig(
        failure_threshold=100, failure_rate=0.5, min_calls=4, cooldown=30
    )
    bus = make_bus()
    async with bus:
        breaker = bus.breaker("dep", config)
        await breaker.call(succeed)
        await breaker.call(succeed)
        with pytest.raises(ConnectionError):
            await breaker.call(fail)
        after_three = await state_of(breaker)
        with pytest.raises(ConnectionError):
            await breaker.call(fail)
        after_four = await state_of(breaker)

    assert after_three == "closed"
    assert after_four == "open"


async def test_old_failures_leave_window(make_bus: Any) -> None:
    config = BreakerConfig(failure_threshold=3, window=0.5, buckets=5, cooldown=30)
    bus = make_bus()
    async with bus:
        breaker = bus.breaker("dep", config)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await breaker.call(fail)

        async def forgotten() -> bool:
            return (await breaker.state()).failures == 0

        await eventually(forgotten, timeout=5, what="failures out of the window")
        with pytest.raises(ConnectionError):
            await breaker.call(fail)
        state = await breaker.state()

    assert state.state == "closed"
    assert state.failures == 1


async def test_state_uses_stored_window(make_bus: Any) -> None:
    recorder, reader = make_bus(), make_bus()
    config = BreakerConfig(failure_threshold=5, window=0.5, buckets=5)
    async with recorder, reader:
        for _ in range(2):
            await recorder.breaker("dep", config).record_failure()
        # The reader has the default 60 s window in its own config.
        seen = reader.breaker("dep")
        right_after = (await seen.state()).failures

        async def forgotten() -> bool:
            return (await seen.state()).failures == 0

        await eventually(forgotten, timeout=5, what="failures out of the window")

    assert right_after == 2


async def test_excluded_errors_count_as_success(make_bus: Any) -> None:
    config = BreakerConfig(failure_threshold=1, excluded=(LookupError,))
    bus = make_bus()

    async def not_found() -> None:
        raise KeyError("order o-9")

    async with bus:
        breaker = bus.breaker("dep", config)
        with pytest.raises(KeyError):
            await breaker.call(not_found)
        state = await breaker.state()

    assert state.state == "closed"
    assert state.failures == 0


def test_invalid_config_rejected() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerConfig(failure_threshold=0)
    with pytest.raises(ValueError, match="failure_rate"):
        BreakerConfig(failure_rate=1.5)
    with pytest.raises(ValueError, match="window"):
        BreakerConfig(window=0)


# -- half-open and closing -----------------------------------------------------


async def test_one_probe_across_two_buses(make_bus: Any) -> None:
    first, second = make_bus(), make_bus()
    release = asyncio.Event()
    probes = 0

    async def slow_probe() -> str:
        nonlocal probes
        probes += 1
        await release.wait()
        return "ok"

    async with first, second:
        breakers = [first.breaker("dep", FAST), second.breaker("dep", FAST)]
        await open_breaker(breakers[0])
        await wait_half_open_due(breakers[1])
        calls = [
            asyncio.ensure_future(breaker.call(slow_probe))
            for _ in range(10)
            for breaker in breakers
        ]
        await eventually(lambda: probes == 1, what="the probe started")
        await eventually(lambda: _done_count(calls) == 19, what="19 calls rejected")
        half_open = await state_of(breakers[0])
        release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        closed = await state_of(breakers[1])

    assert probes == 1
    assert half_open == "half_open"
    assert results.count("ok") == 1
    assert sum(isinstance(r, BreakerOpenError) for r in results) == 19
    assert closed == "closed"


def _done_count(calls: list[asyncio.Future[Any]]) -> int:
    return sum(c.done() for c in calls)


async def test_probe_success_closes(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        breaker = bus.breaker("dep", FAST)
        await open_breaker(breaker)
        await wait_half_open_due(breaker)
        result = await breaker.call(succeed)
        state = await breaker.state()

    assert result == "ok"
    assert state.state == "closed"
    assert state.failures == 0


async def test_probe_failure_reopens(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        breaker = bus.breaker("dep", FAST)
        await open_breaker(breaker)
        first_open = (await breaker.state()).opened_at_ms
        await wait_half_open_due(breaker)
        with pytest.raises(ConnectionError):
            await breaker.call(fail)
        state = await breaker.state()
        permit = await breaker.acquire()

    assert state.state == "open"
    assert state.opened_at_ms > first_open
    assert permit.verdict == "reject"


async def test_expired_probe_lease_allows_new_probe(make_bus: Any) -> None:
    config = BreakerConfig(failure_threshold=1, cooldown=0.1, probe_timeout=0.3)
    bus = make_bus()
    async with bus:
        breaker = bus.breaker("dep", config)
        with pytest.raises(ConnectionError):
            await breaker.call(fail)
        await wait_half_open_due(breaker)
        lost = await breaker.acquire()  # a probe whose process then died
        blocked = await breaker.acquire()
        await wait_half_open_due(breaker)
        retaken = await breaker.acquire()
        closed = await breaker.record(retaken, success=True)
        late = await breaker.record(lost, success=False)

    assert lost.verdict == "probe"
    assert blocked.verdict == "reject"
    assert retaken.verdict == "probe"
    assert closed == "closed"
    assert late == "closed"


async def test_cancelled_probe_releases_lease(make_bus: Any) -> None:
    bus = make_bus()
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    async with bus:
        breaker = bus.breaker("dep", FAST)
        await open_breaker(breaker)
        await wait_half_open_due(breaker)
        probe = asyncio.ensure_future(breaker.call(hang))
        await started.wait()
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        after = await breaker.acquire()

    assert after.verdict == "probe"


async def test_reset_closes_breaker(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        breaker = bus.breaker("dep", FAST)
        await open_breaker(breaker)
        await breaker.reset()
        state = await breaker.state()

    assert state.state == "closed"
    assert state.failures == 0


# -- events and logs -------------------------------------------------------------


async def test_state_changes_published(make_bus: Any) -> None:
    bus = make_bus()
    changes: list[tuple[str, str, str]] = []

    @bus.subscribe(BREAKER_CHANNEL, raw=True, types=[BREAKER_CHANGED_TYPE])
    async def watch(event: Event[Any]) -> None:
        data = event.data
        changes.append((data["breaker"], data["before"], data["after"]))

    async with bus:
        breaker = bus.breaker("dep", FAST)
        await open_breaker(breaker)
        await wait_half_open_due(breaker)
        await breaker.call(succeed)
        await eventually(lambda: len(changes) == 3, what="3 breaker changes")

    assert changes == [
        ("dep", "closed", "open"),
        ("dep", "open", "half_open"),
        ("dep", "half_open", "closed"),
    ]


async def test_open_and_close_logged(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hivebus.breaker")
    bus = make_bus()
    async with bus:
        breaker = bus.breaker("dep", FAST)
        await open_breaker(breaker)
        await wait_half_open_due(breaker)
        await breaker.call(succeed)

    messages = [r.getMessage() for r in caplog.records if r.name == "hivebus.breaker"]
    opened = [m for m in messages if m.startswith("circuit breaker opened")]
    closed = [m for m in messages if m.startswith("circuit breaker closed")]
    assert len(opened) == 1
    assert "breaker=dep" in opened[0]
    assert "failures=3" in opened[0]
    assert closed == ["circuit breaker closed breaker=dep was=half_open"]


# -- a breaker on a durable subscription -------------------------------------------


async def test_open_breaker_pauses_subscription(make_bus: Any) -> None:
    config = BreakerConfig(failure_threshold=1, cooldown=1.0)
    bus = make_bus()
    started: list[tuple[int, str, int]] = []

    @bus.subscribe("jobs", durable=True, raw=True, breaker=config)
    async def handle(event: Event[Any], delivery: Delivery) -> None:
        seconds, micros = await bus.client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        started.append((now_ms, delivery.entry_id, delivery.attempt))

    # Open the shared breaker from another bus before this one reads anything.
    async with make_bus() as other:
        breaker = other.breaker("jobs.svc", config)
        await breaker.record_failure()
        opened_at = (await breaker.state()).opened_at_ms

    async with bus:
        for n in range(5):
            await bus.publish("jobs", {"n": n}, type="job", raw=True, durable=True)
        await eventually(lambda: len(started) == 5, what="5 events handled")
        stream_ids = [
            i.decode() for i, _ in await bus.client.xrange(bus.keys.stream("jobs"))
        ]
        retry_left = await bus.client.zcard(bus.keys.retry("jobs", "svc"))
        dead = await bus.dlq.count()

    assert min(ms for ms, _, _ in started) >= opened_at + 1000
    # No entry was read while the breaker was open: each ran straight from the
    # channel stream, never postponed through the retry set, on attempt 1.
    assert sorted(entry_id for _, entry_id, _ in started) == stream_ids
    assert {attempt for _, _, attempt in started} == {1}
    assert retry_left == 0
    assert dead == 0


WORKER = """
import asyncio, signal, sys
from hivebus import BreakerConfig, Bus, Delivery, Event, RetryPolicy

# Read the breaker state and count the call in flight in one step, so that a
# call started while half-open is logged as such.
START = '''
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local in_flight = redis.call('INCR', KEYS[2])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('RPUSH', KEYS[3], state .. '|' .. in_flight .. '|' .. ms)
return state
'''

async def main() -> None:
    url, prefix = sys.argv[1:3]
    bus = Bus(url, prefix=prefix, service="svc")
    config = BreakerConfig(failure_threshold=5, window=30, cooldown=2, probe_timeout=10)
    key = f"{prefix}:t"
    start = None

    @bus.subscribe(
        "work", durable=True, raw=True, concurrency=10, breaker=config,
        retry=RetryPolicy(max_attempts=20, base=0.1, cap=0.5),
    )
    async def handle(event: Event, delivery: Delivery) -> None:
        client = bus.client
        names = [bus.keys.breaker("work.svc"), f"{key}:in_flight", f"{key}:calls"]
        await start(keys=names)
        try:
            if await client.exists(f"{key}:down"):
                await client.rpush(f"{key}:failed", event.id)
                raise ConnectionError("downstream is down")
            await asyncio.sleep(0.5)
        finally:
            await client.decr(f"{key}:in_flight")
        await client.hset(f"{key}:handled", event.id, delivery.attempt)

    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await bus.start()
    start = bus.client.register_script(START)
    await bus.client.incr(f"{key}:started")
    await stopping.wait()
    await bus.stop(drain_timeout=5)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_half_open_admits_one_call_across_workers(tmp_path: Path) -> None:
    prefix = new_prefix()
    key = f"{prefix}:t"
    script = tmp_path / "breaker_worker.py"
    script.write_text(WORKER)
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    publisher = Bus(REDIS_URL, prefix=prefix, service="publisher")
    breaker_key = publisher.keys.breaker("work.svc")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        workers.extend(
            spawn_worker(script, prefix, tmp_path / f"worker{n}.log") for n in range(3)
        )
        await eventually(
            lambda: _counter_at_least(client, f"{key}:started", 3),
            timeout=30,
            what="3 workers",
        )
        await client.set(f"{key}:down", "1")
        await publisher.publish_many(
            "work", [{"n": n} for n in range(100)], type="job", raw=True, durable=True
        )
        await eventually(
            lambda: _state_is(client, breaker_key, "open"), what="breaker open"
        )
        # Keep the dependency down through the first probe, which must re-open
        # the breaker; the second probe finds it up again.
        await eventually(
            lambda: _half_open_calls(client, key, 1), timeout=10, what="probe 1"
        )
        await eventually(
            lambda: _state_is(client, breaker_key, "open"), what="breaker re-opened"
        )
        await client.delete(f"{key}:down")
        await eventually(
            lambda: _hlen_at_least(client, f"{key}:handled", 100),
            timeout=40,
            what="100 events handled",
        )
        stop_workers(workers)
        calls = [c.split("|") for c in await client.lrange(f"{key}:calls", 0, -1)]
        failed = await client.llen(f"{key}:failed")
        attempts = await client.hgetall(f"{key}:handled")
        final_state = await client.hget(breaker_key, "state")
        dead = await client.xlen(publisher.keys.dlq("work"))
    finally:
        kill_workers(workers)
        await publisher.stop()
        await delete_prefix(client, prefix)
        await client.aclose()

    probes = [
        (int(in_flight), int(ms))
        for state, in_flight, ms in calls
        if state == "half_open"
    ]
    assert len(probes) == 2
    assert [in_flight for in_flight, _ in probes] == [1, 1]
    # After the failed probe the breaker stayed open for its whole cool-down.
    assert probes[1][1] - probes[0][1] >= 2000
    assert final_state == "closed"
    assert len(attempts) == 100
    # Attempts rose only for calls that really failed, never while open.
    assert sum(int(a) - 1 for a in attempts.values()) == failed
    assert dead == 0


def spawn_worker(script: Path, prefix: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, str(script), REDIS_URL, prefix],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=15)


def kill_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


async def _counter_at_least(client: Any, name: str, count: int) -> bool:
    return int(await client.get(name) or 0) >= count


async def _state_is(client: Any, name: str, state: str) -> bool:
    return await client.hget(name, "state") == state


async def _half_open_calls(client: Any, key: str, count: int) -> bool:
    calls = await client.lrange(f"{key}:calls", 0, -1)
    return sum(c.startswith("half_open|") for c in calls) >= count


async def _hlen_at_least(client: Any, name: str, count: int) -> bool:
    return int(await client.hlen(name)) >= count
