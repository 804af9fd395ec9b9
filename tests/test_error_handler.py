"""The error handler service: error context, failure notices and breaker rules."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from typer.testing import CliRunner

from hivebus import BreakerConfig, Bus, Event, RetryPolicy
from hivebus.bus import DEAD_LETTERED_TYPE, ERRORS_CHANNEL
from hivebus.cli import app
from hivebus.error_handler import (
    FAILURE_TYPE,
    ErrorContext,
    ErrorHandler,
    FailureRecord,
    notify_channel,
)
from tests.conftest import REDIS_URL, delete_prefix, eventually, new_prefix

ONE_TRY = RetryPolicy(max_attempts=1)


def failing_billing(bus: Bus, *, concurrency: int = 16) -> None:
    """Subscribe a billing handler on ``orders`` that always fails."""

    @bus.subscribe(
        "orders",
        durable=True,
        raw=True,
        group="billing",
        retry=ONE_TRY,
        concurrency=concurrency,
    )
    async def bill(event: Event[Any]) -> None:
        raise RuntimeError(f"card declined for {event.data['order']}")


async def publish_order(bus: Bus, order: str, **attributes: Any) -> str:
    result = await bus.publish(
        "orders",
        {"order": order},
        type="order.placed",
        raw=True,
        durable=True,
        **attributes,
    )
    return result.event_id


async def test_dead_letter_recorded_in_context(make_bus: Any) -> None:
    shop, billing, ops = make_bus(service="shop"), make_bus(), make_bus(service="ops")
    failing_billing(billing)
    handler = ErrorHandler(ops, notify=False)

    async with shop, billing, ops:
        event_id = await publish_order(shop, "o-1")
        await eventually(lambda: handler.handled == 1, what="1 announcement handled")
        summary = await handler.context.read()
        (dead,) = await billing.dlq.entries()

    assert summary.total == 1
    assert summary.by_event_type == {"order.placed": 1}
    assert summary.by_subscription == {"orders/billing": 1}
    assert summary.by_error_type == {"RuntimeError": 1}
    assert summary.by_source == {"shop": 1}
    (record,) = summary.recent
    assert record.dead_letter_id == dead.id
    assert record.event_id == event_id
    assert record.error == "card declined for o-1"
    assert record.attempts == 1


async def test_failure_notice_reaches_source(make_bus: Any) -> None:
    shop, billing, ops = make_bus(service="shop"), make_bus(), make_bus(service="ops")
    failing_billing(billing)
    handler = ErrorHandler(ops)
    notices: list[Event[Any]] = []

    @shop.subscribe(notify_channel("shop"), durable=True, raw=True)
    async def on_failure(event: Event[Any]) -> None:
        notices.append(event)

    async with shop, billing, ops:
        event_id = await publish_order(shop, "o-1", correlation_id="checkout-7")
        await eventually(lambda: notices, what="a failure notice")
        (dead,) = await billing.dlq.entries()

    (notice,) = notices
    assert notice.type == FAILURE_TYPE
    assert notice.source == "ops"
    assert notice.causationid == event_id
    assert notice.correlationid == "checkout-7"
    assert notice.data["dead_letter_id"] == dead.id
    assert notice.data["subscription"] == "orders/billing"
    assert notice.data["error_type"] == "RuntimeError"
    assert handler.notified == 1


async def test_recent_keeps_last_n(make_bus: Any) -> None:
    bus = make_bus()
    failing_billing(bus, concurrency=1)
    handler = ErrorHandler(bus, recent_limit=3, notify=False, concurrency=1)

    async with bus:
        ids = [await publish_order(bus, f"o-{n}") for n in range(5)]
        await eventually(lambda: handler.handled == 5, what="5 announcements handled")
        summary = await handler.context.read()

    assert summary.total == 5
    assert [r.event_id for r in summary.recent] == ids[::-1][:3]


async def test_duplicate_announcement_counted_once(make_bus: Any) -> None:
    bus = make_bus()
    handler = ErrorHandler(bus)
    announcement = bus.event(
        {
            "dead_letter_id": "orders/1-0",
            "channel": "orders",
            "subscription": "billing",
            "event_id": "e-1",
            "event_type": "order.placed",
            "event_source": "shop",
            "reason": "retries exhausted after 1 attempt(s)",
            "error_type": "RuntimeError",
            "error": "card declined",
            "attempts": 1,
        },
        type=DEAD_LETTERED_TYPE,
        raw=True,
    )

    async with bus:
        # At-least-once delivery can hand the same announcement twice.
        await bus.publish(ERRORS_CHANNEL, announcement, durable=True)
        await bus.publish(ERRORS_CHANNEL, announcement, durable=True)
        await eventually(lambda: handler.handled == 2, what="2 deliveries handled")
        summary = await handler.context.read()
        notices = await bus.client.xlen(bus.keys.stream(notify_channel("shop")))

    assert summary.total == 1
    assert len(summary.recent) == 1
    assert notices == 1


async def test_undecodable_entry_counted_without_notice(make_bus: Any) -> None:
    bus = make_bus()
    failing_billing(bus)
    handler = ErrorHandler(bus)

    async with bus:
        await bus.client.xadd(bus.keys.stream("orders"), {"e": "{not json"})
        await eventually(lambda: handler.handled == 1, what="1 announcement handled")
        summary = await handler.context.read()

    assert summary.by_source == {"(unknown)": 1}
    assert summary.by_error_type == {"MalformedEventError": 1}
    assert handler.notified == 0


async def test_breaker_rule_opens_breaker(make_bus: Any) -> None:
    bus = make_bus()
    failing_billing(bus)
    handler = ErrorHandler(
        bus, notify=False, breaker_rules={"orders/billing": "payments"}
    )

    async with bus:
        breaker = bus.breaker("payments", BreakerConfig(failure_threshold=2))
        await publish_order(bus, "o-1")
        await eventually(lambda: handler.handled == 1, what="1 announcement handled")
        after_one = (await breaker.state()).state
        await publish_order(bus, "o-2")
        await eventually(lambda: handler.handled == 2, what="2 announcements handled")
        after_two = (await breaker.state()).state

    assert after_one == "closed"
    assert after_two == "open"


async def test_context_reset_forgets_counts(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        context = ErrorContext(bus.client, bus.keys)
        async with bus.client.pipeline(transaction=True) as pipe:
            context.queue_record(pipe, sample_record("d-1"))
            await pipe.execute()
        before = await context.read()
        await context.reset()
        after = await context.read()

    assert before.total == 1
    assert after.total == 0
    assert after.recent == []


def sample_record(
    dead_letter_id: str, error_type: str = "RuntimeError"
) -> FailureRecord:
    return FailureRecord(
        dead_letter_id=dead_letter_id,
        channel="orders",
        subscription="orders/billing",
        event_id=f"e-{dead_letter_id}",
        event_type="order.placed",
        source="shop",
        error_type=error_type,
        error="card declined",
        reason="retries exhausted after 1 attempt(s)",
        attempts=1,
        time="2026-01-01T00:00:00.000+00:00",
    )


def test_cli_errors_show() -> None:
    prefix = new_prefix()

    async def record() -> None:
        bus = Bus(REDIS_URL, prefix=prefix)
        await bus.connect()
        context = ErrorContext(bus.client, bus.keys)
        async with bus.client.pipeline(transaction=True) as pipe:
            context.queue_record(pipe, sample_record("d-1"))
            context.queue_record(pipe, sample_record("d-2", "TimeoutError"))
            await pipe.execute()
        await bus.stop()

    async def clean() -> None:
        bus = Bus(REDIS_URL, prefix=prefix)
        await bus.connect()
        await delete_prefix(bus.client, prefix)
        await bus.stop()

    asyncio.run(record())
    try:
        runner = CliRunner()
        options = ["--redis", REDIS_URL, "--prefix", prefix]
        as_json = runner.invoke(app, ["errors", "show", "--json", *options])
        as_text = runner.invoke(app, ["errors", "show", *options])
    finally:
        asyncio.run(clean())

    assert as_json.exit_code == 0, as_json.output
    shown = json.loads(as_json.stdout)
    assert shown["total"] == 2
    assert shown["by_error_type"] == {"RuntimeError": 1, "TimeoutError": 1}
    assert [r["dead_letter_id"] for r in shown["recent"]] == ["d-2", "d-1"]
    assert as_text.exit_code == 0, as_text.output
    assert "failures recorded: 2" in as_text.stdout
    assert "orders/billing" in as_text.stdout
