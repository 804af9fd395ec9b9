"""The dead-letter queue: entry content, retention, replay, purge and bad entries."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel

from hivebus import Bus, DeadLetter, Delivery, Event, RetryPolicy
from hivebus.connection import memory_server
from hivebus.dlq import TRACEBACK_LINES, Failure
from hivebus.errors import DeadLetterNotFoundError
from tests.conftest import eventually

DAY = 24 * 60 * 60


class OrderPlaced(BaseModel):
    order_id: str
    total: float


@pytest.fixture
async def plain_client(url: str) -> AsyncIterator[Any]:
    """A plain redis-py client on the test's backend, with no hivebus code."""
    if url.startswith("memory://"):
        client: Any = fakeredis.FakeAsyncRedis(server=memory_server(url))
    else:
        client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def publish_job(bus: Bus, data: dict[str, Any], **attributes: Any) -> str:
    result = await bus.publish(
        "jobs", data, type="job", raw=True, durable=True, **attributes
    )
    return result.event_id


async def add_dead_letter(bus: Bus, name: str, group: str = "svc") -> str:
    """Store a dead letter directly, as a consumer would."""
    event = bus.event({"name": name}, type="job", raw=True)
    return await bus.dlq.add(
        channel="jobs",
        subscription=group,
        body=event.model_dump_json(),
        failure=Failure("retries exhausted after 1 attempt(s)", ValueError(name), 1),
        event=event.model_dump(mode="json"),
    )


async def server_ms(bus: Bus) -> int:
    seconds, micros = await bus.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


# -- dead-letter content ------------------------------------------------


def fail_deep(depth: int) -> None:
    if depth == 0:
        raise RuntimeError("ledger row 7 is locked")
    fail_deep(depth - 1)


async def test_entry_keeps_failure_context(make_bus: Any) -> None:
    bus = make_bus()

    @bus.subscribe(
        "jobs",
        durable=True,
        raw=True,
        retry=RetryPolicy(max_attempts=3, base=0.1, cap=1.0, jitter="none"),
    )
    async def handle(event: Event[Any]) -> None:
        fail_deep(30)

    async with bus:
        event_id = await publish_job(bus, {"n": 1}, subject="order-1")
        await eventually(lambda: bus.dlq.count("jobs"), what="a dead letter")
        (entry,) = await bus.dlq.entries(channel="jobs")
        (origin,) = await bus.client.xrange(bus.keys.stream("jobs"))

    assert entry.event is not None
    assert entry.event["id"] == event_id
    assert entry.event["data"] == {"n": 1}
    assert entry.event["subject"] == "order-1"
    assert entry.channel == "jobs"
    assert entry.subscription == "svc"
    assert entry.error_type == "RuntimeError"
    assert entry.error == "ledger row 7 is locked"
    assert entry.attempts == 3
    assert entry.origin_id == origin[0].decode()
    assert entry.traceback.endswith("RuntimeError: ledger row 7 is locked")
    assert len(entry.traceback.splitlines()) == TRACEBACK_LINES
    # Attempts 2 and 3 waited 0.1 s and 0.2 s after the first failure.
    assert entry.last_failure_ms - entry.first_failure_ms >= 300


async def test_entry_to_dict_is_json(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        dead_letter_id = await add_dead_letter(bus, "a")
        entry = await bus.dlq.get(dead_letter_id)

    data = json.loads(json.dumps(entry.to_dict()))
    assert data["id"] == dead_letter_id
    assert data["event"]["data"] == {"name": "a"}
    assert data["last_failure"].endswith("+00:00")


async def test_dead_letter_logs_info_with_id(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hivebus")
    bus = make_bus()
    async with bus:
        dead_letter_id = await add_dead_letter(bus, "a")

    lines = [r for r in caplog.records if "event dead-lettered" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert f"dead_letter_id={dead_letter_id}" in lines[0].getMessage()


# -- retention and purge -----------------------------------------------------


async def test_retention_default_seven_days(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        assert bus.dlq.retention == 7 * DAY


async def test_retention_trims_by_age(make_bus: Any) -> None:
    bus = make_bus(dlq_retention=0.5)
    async with bus:
        old = await add_dead_letter(bus, "old")
        await eventually(lambda: _count_is(bus, 0), timeout=5, what="old entry trimmed")
        new = await add_dead_letter(bus, "new")
        ids = [entry.id for entry in await bus.dlq.entries(channel="jobs")]

    assert old not in ids
    assert ids == [new]


async def test_purge_older_than_keeps_new(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        old = await add_dead_letter(bus, "old")
        added_ms = int(old.rpartition("/")[2].partition("-")[0])
        await eventually(
            lambda: _at_least(bus, added_ms + 400), what="old entry 0.4 s old"
        )
        new = await add_dead_letter(bus, "new")
        removed = await bus.dlq.purge(older_than=0.3)
        ids = [entry.id for entry in await bus.dlq.entries()]

    assert removed == 1
    assert ids == [new]


async def _at_least(bus: Bus, ms: int) -> bool:
    return await server_ms(bus) >= ms


async def test_purge_all_empties_queue(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        for name in "abc":
            await add_dead_letter(bus, name)
        removed = await bus.dlq.purge()
        left = await bus.dlq.count()

    assert removed == 3
    assert left == 0


async def test_purge_one_subscription(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        await add_dead_letter(bus, "a", group="billing")
        kept = await add_dead_letter(bus, "b", group="shipping")
        removed = await bus.dlq.purge(subscription="jobs/billing")
        ids = [entry.id for entry in await bus.dlq.entries()]

    assert removed == 1
    assert ids == [kept]


async def test_entries_filter_by_subscription(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        billing = await add_dead_letter(bus, "a", group="billing")
        await add_dead_letter(bus, "b", group="shipping")
        by_group = await bus.dlq.entries(subscription="billing")
        by_name = await bus.dlq.entries(subscription="jobs/billing")
        other_channel = await bus.dlq.entries(subscription="mail/billing")

    assert [e.id for e in by_group] == [billing]
    assert [e.id for e in by_name] == [billing]
    assert other_channel == []


# -- replay ------------------------------------------------------------------


async def test_replay_after_fix_handled_once(make_bus: Any) -> None:
    bus = make_bus()
    broken = True
    handled: list[tuple[str, int]] = []

    @bus.subscribe(
        "jobs", durable=True, raw=True, retry=RetryPolicy(max_attempts=2, base=0.05)
    )
    async def handle(event: Event[Any], delivery: Delivery) -> None:
        if broken:
            raise RuntimeError("bug in the handler")
        handled.append((event.id, delivery.attempt))

    async with bus:
        event_id = await publish_job(bus, {"n": 1})
        await eventually(lambda: bus.dlq.count("jobs"), what="a dead letter")
        (entry,) = await bus.dlq.entries(channel="jobs")
        broken = False
        replayed = await bus.dlq.replay(entry.id)
        await eventually(lambda: handled, what="the replayed event handled")
        left = await bus.dlq.count("jobs")
        redo_left = await bus.client.xlen(bus.keys.redo("jobs", "svc"))
        stats = bus.consumers[0].stats

    assert replayed.event_id == event_id
    assert handled == [(event_id, 1)]
    assert left == 0
    assert redo_left == 0
    assert stats.handled == 1


async def test_replay_unknown_id_raises(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        with pytest.raises(DeadLetterNotFoundError, match="jobs/1-0"):
            await bus.dlq.replay("jobs/1-0")
        with pytest.raises(DeadLetterNotFoundError, match="CHANNEL/ENTRY_ID"):
            await bus.dlq.replay("no-slash")


async def test_concurrent_replays_deliver_once(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        dead_letter_id = await add_dead_letter(bus, "a")
        results = await asyncio.gather(
            *(bus.dlq.replay(dead_letter_id) for _ in range(5)),
            return_exceptions=True,
        )
        redo = await bus.client.xrange(bus.keys.redo("jobs", "svc"))

    replayed = [r for r in results if not isinstance(r, BaseException)]
    missing = [r for r in results if isinstance(r, DeadLetterNotFoundError)]
    assert len(replayed) == 1
    assert len(missing) == 4
    assert len(redo) == 1
    assert redo[0][1][b"a"] == b"1"


async def test_replay_all_in_publish_order(make_bus: Any) -> None:
    """Per-subject order is not kept through retries, but replay keeps it."""
    bus = make_bus()
    broken = True
    handled: list[tuple[str, int, str, int]] = []

    @bus.subscribe(
        "jobs",
        durable=True,
        raw=True,
        concurrency=1,
        retry=RetryPolicy(max_attempts=2, base=0.2, cap=0.2, jitter="none"),
    )
    async def handle(event: Event[Any], delivery: Delivery) -> None:
        subject, seq = event.subject or "", int(event.data["seq"])
        if subject == "order-42" and seq == 2 and delivery.attempt == 1:
            raise ConnectionError("transient")
        if broken and subject == "order-43" and seq == 5:
            raise DeadLetter("seq 5 is refused at once")
        if broken and subject == "order-43" and seq >= 3:
            raise RuntimeError("permanent until fixed")
        handled.append((subject, seq, event.id, delivery.attempt))

    async with bus:
        ids: dict[tuple[str, int], str] = {}
        for seq in range(1, 6):
            for subject in ("order-42", "order-43"):
                event_id = await publish_job(bus, {"seq": seq}, subject=subject)
                ids[(subject, seq)] = event_id
        await eventually(lambda: _count_is(bus, 3), timeout=10, what="3 dead letters")
        dead_order = [e.event_id for e in reversed(await bus.dlq.entries())]
        broken = False
        replayed = await bus.dlq.replay_all(channel="jobs")
        await eventually(lambda: len(handled) == 10, what="10 events handled")
        left = await bus.dlq.count()

    assert dead_order[0] == ids[("order-43", 5)]
    assert [e.event_id for e in replayed] == [ids[("order-43", s)] for s in (3, 4, 5)]
    after_replay = handled[-3:]
    assert [(s, n, i) for s, n, i, _ in after_replay] == [
        ("order-43", n, ids[("order-43", n)]) for n in (3, 4, 5)
    ]
    assert [attempt for *_, attempt in after_replay] == [1, 1, 1]
    assert sorted(n for s, n, *_ in handled if s == "order-42") == [1, 2, 3, 4, 5]
    assert left == 0


async def _count_is(bus: Bus, count: int) -> bool:
    return await bus.dlq.count() == count


# -- entries that cannot be handled ------------------------------------------


def schema_violation() -> dict[bytes, bytes]:
    envelope = {
        "specversion": "1.0",
        "id": "bad-schema-1",
        "source": "elsewhere",
        "type": "order.placed",
        "data": {"order_id": "o-1", "total": "not a number"},
    }
    return {b"e": json.dumps(envelope).encode()}


BAD_ENTRIES = {
    "malformed_json": ({b"e": b"{not json"}, "undecodable entry: not a valid"),
    "schema_violation": (schema_violation(), "undecodable entry: payload of event"),
    "missing_event_field": ({b"x": b"1"}, "entry has no event field 'e'"),
    "attempt_not_integer": (
        {**schema_violation(), b"a": b"notanint"},
        "entry has invalid attempt fields",
    ),
    "negative_attempt": (
        {**schema_violation(), b"a": b"-5", b"ff": b"zz"},
        "entry has invalid attempt fields",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_ENTRIES))
async def test_bad_entry_dead_lettered(
    make_bus: Any, plain_client: Any, kind: str
) -> None:
    fields, reason = BAD_ENTRIES[kind]
    bus = make_bus()
    bus.types.register("order.placed", OrderPlaced)
    handled: list[str] = []

    @bus.subscribe("orders", durable=True)
    async def handle(event: Event[OrderPlaced]) -> None:
        handled.append(event.data.order_id)

    async with bus:
        await plain_client.xadd(bus.keys.stream("orders"), fields)
        await bus.publish(
            "orders", OrderPlaced(order_id="o-2", total=5.0), durable=True
        )
        await eventually(lambda: handled, what="the good event handled")
        await eventually(lambda: bus.dlq.count("orders"), what="a dead letter")
        (entry,) = await bus.dlq.entries(channel="orders")
        pending = await bus.client.xpending(bus.keys.stream("orders"), "svc")

    assert handled == ["o-2"]
    assert entry.reason.startswith(reason)
    assert entry.subscription == "svc"
    assert pending["pending"] == 0


async def test_bad_entry_logged_warning(
    make_bus: Any, plain_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bus = make_bus()

    @bus.subscribe("orders", durable=True)
    async def handle(event: Event[OrderPlaced]) -> None:
        pass

    caplog.set_level(logging.WARNING, logger="hivebus.handling")
    async with bus:
        added = await plain_client.xadd(bus.keys.stream("orders"), {b"e": b"{oops"})
        await eventually(lambda: bus.dlq.count("orders"), what="a dead letter")

    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    entry_id = added.decode() if isinstance(added, bytes) else added
    assert any(f"entry_id={entry_id}" in line for line in lines)
    assert any("undecodable entry" in line for line in lines)
