"""Retry policies: backoff, jitter, which errors retry, and retries across workers."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from hivebus import Bus, DeadLetter, Delivery, Event, RetryLater, RetryPolicy
from hivebus.errors import SchemaError
from tests.conftest import REDIS_URL, delete_prefix, eventually, new_prefix
from tests.workers.control import Worker, reaped

# -- the policy on its own ----------------------------------------------


def test_ceiling_doubles_until_cap() -> None:
    policy = RetryPolicy(base=0.5, cap=3.0)
    ceilings = [policy.ceiling(attempt) for attempt in range(1, 6)]
    assert ceilings == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_ceiling_huge_attempt_is_cap() -> None:
    assert RetryPolicy(base=1.0, cap=30.0).ceiling(10_000) == 30.0


def test_no_jitter_waits_ceiling() -> None:
    policy = RetryPolicy(base=0.25, cap=10.0, jitter="none")
    assert [policy.delay(n) for n in (1, 2, 3)] == [0.25, 0.5, 1.0]


def test_full_jitter_within_ceiling() -> None:
    policy = RetryPolicy(base=1.0, cap=8.0, jitter="full")
    for attempt in range(1, 6):
        ceiling = policy.ceiling(attempt)
        delays = [policy.delay(attempt) for _ in range(2000)]
        assert min(delays) >= 0.0
        assert max(delays) <= ceiling
        # Full jitter spreads over the whole range, not near the ceiling only.
        assert min(delays) < ceiling * 0.1
        assert max(delays) > ceiling * 0.9


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"base": -1.0}, "base"),
        ({"cap": -1.0}, "cap"),
        ({"jitter": "half"}, "jitter"),
        ({"retry_on": (ValueError, "oops")}, "retry_on"),
    ],
)
def test_invalid_policy_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**options)


def test_decide_dead_letter_never_retried() -> None:
    policy = RetryPolicy(max_attempts=5, never_retry=())
    decision = policy.decide(DeadLetter("customer unknown"), 1)
    assert decision.retry is False
    assert "customer unknown" in decision.reason


def test_decide_retry_later_own_delay() -> None:
    policy = RetryPolicy(max_attempts=3, base=30.0, retry_on=(TimeoutError,))
    assert policy.decide(RetryLater(delay=0.0), 1).delay == 0.0
    assert policy.decide(RetryLater(delay=2.5), 2).delay == 2.5


def test_decide_retry_later_exhausted() -> None:
    decision = RetryPolicy(max_attempts=2).decide(RetryLater(delay=1.0), 2)
    assert decision.retry is False
    assert decision.exhausted is True


def test_decide_retry_on_filters() -> None:
    policy = RetryPolicy(retry_on=(TimeoutError,))
    assert policy.decide(TimeoutError("slow"), 1).retry is True
    rejected = policy.decide(ValueError("bad"), 1)
    assert rejected.retry is False
    assert rejected.reason == "not retried (ValueError is not in retry_on)"


def test_decide_never_retry_wins() -> None:
    policy = RetryPolicy()
    decision = policy.decide(SchemaError("bad payload"), 1)
    assert decision.retry is False
    assert decision.exhausted is False


def test_decide_last_attempt_exhausted() -> None:
    decision = RetryPolicy(max_attempts=3).decide(RuntimeError("x"), 3)
    assert decision.retry is False
    assert decision.exhausted is True
    assert decision.reason == "retries exhausted after 3 attempt(s)"


# -- retries through a durable subscription ------------------------------


class Calls:
    """What a test handler saw: one (attempt, monotonic time) per call, by event."""

    def __init__(self) -> None:
        self.by_event: dict[str, list[tuple[int, float]]] = {}
        self.order: list[str] = []

    def add(self, event: Event[Any], delivery: Delivery) -> None:
        self.by_event.setdefault(event.id, []).append(
            (delivery.attempt, time.monotonic())
        )
        self.order.append(event.id)

    def attempts(self, event_id: str) -> list[int]:
        return [attempt for attempt, _ in self.by_event.get(event_id, [])]

    def gaps(self, event_id: str) -> list[float]:
        times = [moment for _, moment in self.by_event.get(event_id, [])]
        return [later - earlier for earlier, later in itertools.pairwise(times)]


async def publish_one(bus: Bus, data: dict[str, Any], **attributes: Any) -> str:
    result = await bus.publish(
        "jobs", data, type="job", raw=True, durable=True, **attributes
    )
    return result.event_id


async def test_retry_gaps_grow(make_bus: Any) -> None:
    bus = make_bus()
    calls = Calls()
    done = asyncio.Event()

    @bus.subscribe(
        "jobs",
        durable=True,
        raw=True,
        retry=RetryPolicy(max_attempts=5, base=1.0, cap=10.0, jitter="none"),
    )
    async def flaky(event: Event[Any], delivery: Delivery) -> None:
        calls.add(event, delivery)
        if delivery.attempt < 3:
            raise ConnectionError(f"attempt {delivery.attempt} fails")
        done.set()

    async with bus:
        event_id = await publish_one(bus, {"n": 1})
        await asyncio.wait_for(done.wait(), timeout=15)

    assert calls.attempts(event_id) == [1, 2, 3]
    first_gap, second_gap = calls.gaps(event_id)
    assert first_gap >= 1.0
    assert second_gap >= 2.0
    assert second_gap > first_gap


async def test_always_failing_ends_in_dlq(make_bus: Any) -> None:
    bus = make_bus()
    calls = Calls()

    @bus.subscribe(
        "jobs",
        durable=True,
        raw=True,
        retry=RetryPolicy(max_attempts=3, base=0.05, cap=0.1),
    )
    async def broken(event: Event[Any], delivery: Delivery) -> None:
        calls.add(event, delivery)
        raise RuntimeError("the database is gone")

    async with bus:
        event_id = await publish_one(bus, {"n": 1})
        await eventually(lambda: bus.dlq.count("jobs"), what="a dead letter")
        (entry,) = await bus.dlq.entries(channel="jobs")

    assert calls.attempts(event_id) == [1, 2, 3]
    assert entry.event_id == event_id
    assert entry.attempts == 3
    assert entry.reason == "retries exhausted after 3 attempt(s)"
    assert entry.error_type == "RuntimeError"


async def test_dead_letter_signal_skips_retries(make_bus: Any) -> None:
    bus = make_bus()
    calls = Calls()

    @bus.subscribe("jobs", durable=True, raw=True, retry=RetryPolicy(max_attempts=5))
    async def refuse(event: Event[Any], delivery: Delivery) -> None:
        calls.add(event, delivery)
        raise DeadLetter("customer c-9 does not exist")

    async with bus:
        event_id = await publish_one(bus, {"customer": "c-9"})
        await eventually(lambda: bus.dlq.count("jobs"), what="a dead letter")
        (entry,) = await bus.dlq.entries(channel="jobs")

    assert calls.attempts(event_id) == [1]
    assert entry.reason == "dead-lettered by the handler: customer c-9 does not exist"
    assert entry.attempts == 1


async def test_retry_later_uses_its_delay(make_bus: Any) -> None:
    bus = make_bus()
    calls = Calls()
    done = asyncio.Event()

    # The policy's own backoff (60 s) would time the test out: only the
    # handler's delay can bring attempt 2 this soon.
    @bus.subscribe(
        "jobs",
        durable=True,
        raw=True,
        retry=RetryPolicy(max_attempts=3, base=60.0, cap=60.0, jitter="none"),
    )
    async def later(event: Event[Any], delivery: Delivery) -> None:
        calls.add(event, delivery)
        if delivery.attempt == 1:
            raise RetryLater("rate limited", delay=0.3)
        done.set()

    async with bus:
        event_id = await publish_one(bus, {"n": 1})
        await asyncio.wait_for(done.wait(), timeout=10)

    assert calls.attempts(event_id) == [1, 2]
    assert calls.gaps(event_id)[0] >= 0.3


async def test_unlisted_error_not_retried(make_bus: Any) -> None:
    bus = make_bus()
    calls = Calls()

    @bus.subscribe(
        "jobs",
        durable=True,
        raw=True,
        retry=RetryPolicy(max_attempts=5, base=0.05, retry_on=(TimeoutError,)),
    )
    async def strict(event: Event[Any], delivery: Delivery) -> None:
        calls.add(event, delivery)
        raise ValueError("quantity must be positive")

    async with bus:
        event_id = await publish_one(bus, {"n": 1})
        await eventually(lambda: bus.dlq.count("jobs"), what="a dead letter")
        (entry,) = await bus.dlq.entries(channel="jobs")

    assert calls.attempts(event_id) == [1]
    assert entry.reason == "not retried (ValueError is not in retry_on)"
    assert entry.error == "quantity must be positive"


async def test_poison_does_not_block_later(make_bus: Any) -> None:
    bus = make_bus()
    calls = Calls()
    poison_calls_when_done: list[int] = []
    normal_ids: set[str] = set()
    poison_id = ""

    @bus.subscribe(
        "jobs",
        durable=True,
        raw=True,
        concurrency=1,
        retry=RetryPolicy(max_attempts=3, base=2.0, cap=2.0, jitter="none"),
    )
    async def handle(event: Event[Any], delivery: Delivery) -> None:
        calls.add(event, delivery)
        if event.data.get("poison"):
            raise RuntimeError("cannot parse this order")
        if normal_ids and all(i in calls.by_event for i in normal_ids):
            poison_calls_when_done.append(len(calls.by_event[poison_id]))

    async with bus:
        poison_id = await publish_one(bus, {"poison": True})
        for n in range(10):
            normal_ids.add(await publish_one(bus, {"n": n}))
        await eventually(
            lambda: bool(poison_calls_when_done), timeout=10, what="10 normal events"
        )

    # Every later event ran while the poison event waited for its first backoff.
    assert poison_calls_when_done == [1]


async def test_retry_keeps_event_identity(make_bus: Any) -> None:
    bus = make_bus()
    seen: list[tuple[str, str | None, str | None, int]] = []
    done = asyncio.Event()

    @bus.subscribe(
        "jobs", durable=True, raw=True, retry=RetryPolicy(base=0.05, cap=0.1)
    )
    async def handle(event: Event[Any], delivery: Delivery) -> None:
        seen.append((event.id, event.causationid, event.subject, delivery.attempt))
        if delivery.attempt == 1:
            raise ConnectionError("try again")
        done.set()

    async with bus:
        event_id = await publish_one(
            bus, {"seq": 1}, causation_id="cause-1", subject="order-42"
        )
        await asyncio.wait_for(done.wait(), timeout=10)

    assert seen == [
        (event_id, "cause-1", "order-42", 1),
        (event_id, "cause-1", "order-42", 2),
    ]


# -- log lines ---------------------------------------------------------------


async def test_scheduled_retry_logs_info(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hivebus")
    bus = make_bus()
    done = asyncio.Event()

    @bus.subscribe(
        "jobs",
        durable=True,
        raw=True,
        retry=RetryPolicy(base=0.25, cap=1.0, jitter="none"),
    )
    async def handle(event: Event[Any], delivery: Delivery) -> None:
        if delivery.attempt == 1:
            raise ConnectionError("try again")
        done.set()

    async with bus:
        event_id = await publish_one(bus, {"n": 1})
        await asyncio.wait_for(done.wait(), timeout=10)

    lines = [r for r in caplog.records if "retry scheduled" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert f"event_id={event_id}" in lines[0].getMessage()
    assert "delay=0.25s" in lines[0].getMessage()


async def test_exhausted_retries_log_warning(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hivebus")
    bus = make_bus()

    @bus.subscribe(
        "jobs", durable=True, raw=True, retry=RetryPolicy(max_attempts=2, base=0.05)
    )
    async def handle(event: Event[Any]) -> None:
        raise RuntimeError("always")

    async with bus:
        event_id = await publish_one(bus, {"n": 1})
        await eventually(lambda: bus.dlq.count("jobs"), what="a dead letter")

    lines = [
        r for r in caplog.records if r.getMessage().startswith("retries exhausted")
    ]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert f"event_id={event_id}" in lines[0].getMessage()
    assert "attempts=2" in lines[0].getMessage()


# -- two worker processes ----------------------------------------------------


@pytest.mark.slow
async def test_two_workers_retry_once_each(tmp_path: Path) -> None:
    prefix = new_prefix()
    client = aioredis.Redis.from_url(REDIS_URL)
    options = {
        "url": REDIS_URL,
        "prefix": prefix,
        "channel": "work",
        "group": "workers",
        "concurrency": 5,
        "max_attempts": 3,
        "backoff_base": 0.2,
        "backoff_cap": 0.2,
        "fail_first": 1,
    }
    workers = [Worker(tmp_path / f"worker{n}.log", **options) for n in range(2)]
    publisher = Bus(REDIS_URL, prefix=prefix, service="publisher")
    try:
        with reaped(workers):
            for worker in workers:
                worker.start()
            await eventually(
                lambda: _started(client, prefix, 2), timeout=20, what="2 workers"
            )
            jobs = [{"id": f"job-{n:02d}"} for n in range(50)]
            await publisher.publish_many(
                "work", jobs, type="test.job", raw=True, durable=True
            )
            await eventually(
                lambda: _handled(client, prefix, 50), timeout=30, what="50 handled"
            )
            for worker in workers:
                worker.stop()
            runs = await client.lrange(f"{prefix}:t:runs", 0, -1)
            retry_left = await client.zcard(publisher.keys.retry("work", "workers"))
    finally:
        await publisher.stop()
        await delete_prefix(client, prefix)
        await client.aclose()

    attempts: dict[tuple[str, str], int] = {}
    for run in runs:
        job_id, attempt, _, _ = run.decode().split("|")
        attempts[(job_id, attempt)] = attempts.get((job_id, attempt), 0) + 1
    second = {job: n for (job, attempt), n in attempts.items() if attempt == "2"}
    assert len(second) == 50
    assert set(second.values()) == {1}
    assert not any(attempt == "3" for _, attempt in attempts)
    assert retry_left == 0


async def _started(client: Any, prefix: str, count: int) -> bool:
    return int(await client.get(f"{prefix}:t:started") or 0) >= count


async def _handled(client: Any, prefix: str, count: int) -> bool:
    return int(await client.scard(f"{prefix}:t:handled")) >= count
