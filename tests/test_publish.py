"""Publishing: storage by id with a TTL, delivery reports, batches, bad input."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import BaseModel

from hivebus import (
    Bus,
    Event,
    EventNotFoundError,
    InvalidEventError,
)
from hivebus.errors import (
    EventTooLargeError,
    InvalidChannelError,
    SchemaError,
    UnknownEventTypeError,
)
from tests.conftest import eventually


class OrderPlaced(BaseModel):
    order_id: str
    total: float


def with_orders(bus: Bus) -> Bus:
    bus.types.register("order.placed", OrderPlaced)
    return bus


async def test_publish_stores_event_by_id(make_bus: Any) -> None:
    bus = with_orders(make_bus())
    async with bus:
        result = await bus.publish("orders", OrderPlaced(order_id="o-1", total=2.5))
        stored = await bus.get_event(result.event_id)
    assert stored.id == result.event_id
    assert stored.type == "order.placed"
    assert stored.source == "svc"
    assert stored.data == {"order_id": "o-1", "total": 2.5}


async def test_stored_event_ttl_is_one_day(make_bus: Any) -> None:
    bus = with_orders(make_bus())
    async with bus:
        result = await bus.publish("orders", OrderPlaced(order_id="o-1", total=1))
        ttl = await bus.client.ttl(bus.keys.event(result.event_id))
    assert 86_390 <= ttl <= 86_400


async def test_stored_event_expires_after_ttl(make_bus: Any) -> None:
    bus = with_orders(make_bus(event_ttl=0.3))
    async with bus:
        result = await bus.publish("orders", OrderPlaced(order_id="o-1", total=1))
        assert (await bus.get_event(result.event_id)).id == result.event_id

        async def gone() -> bool:
            try:
                await bus.get_event(result.event_id)
            except EventNotFoundError:
                return True
            return False

        await eventually(gone, timeout=5, what="stored event expiry")


async def test_get_unknown_event_names_id(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        with pytest.raises(EventNotFoundError, match="'nope'"):
            await bus.get_event("nope")


async def test_report_counts_listeners_and_groups(make_bus: Any) -> None:
    bus = with_orders(make_bus())
    got: asyncio.Queue[str] = asyncio.Queue()

    @bus.subscribe("orders")
    async def listener(event: Event[OrderPlaced]) -> None:
        await got.put(event.id)

    @bus.subscribe("orders", durable=True, group="billing")
    async def billing(event: Event[OrderPlaced]) -> None:
        pass

    @bus.subscribe("orders", durable=True, group="shipping")
    async def shipping(event: Event[OrderPlaced]) -> None:
        pass

    async with bus:
        broadcast = await bus.publish("orders", OrderPlaced(order_id="a", total=1))
        durable = await bus.publish(
            "orders", OrderPlaced(order_id="b", total=1), durable=True
        )
        assert await asyncio.wait_for(got.get(), 5) == broadcast.event_id
    assert broadcast.listeners == 1
    assert broadcast.groups == 0
    assert durable.groups == 2
    assert durable.listeners == 0


async def test_unobserved_event_is_counted(make_bus: Any) -> None:
    bus = with_orders(make_bus())
    async with bus:
        result = await bus.publish("nobody", OrderPlaced(order_id="a", total=1))
        durable = await bus.publish(
            "nobody.durable", OrderPlaced(order_id="a", total=1), durable=True
        )
        await eventually(
            lambda: bus.client.hget(bus.keys.stats, "unobserved:nobody"),
            what="unobserved counter in Redis",
        )
    assert not result.delivered
    assert not durable.delivered
    assert bus.unobserved == 2


async def test_publish_many_returns_one_report_each(make_bus: Any) -> None:
    bus = with_orders(make_bus())
    async with bus:
        orders = [OrderPlaced(order_id=f"o-{i}", total=i) for i in range(100)]
        results = await bus.publish_many("orders", orders, durable=True)
        length = await bus.client.xlen(bus.keys.stream("orders"))
        stored = await bus.get_event(results[42].event_id)
    assert len({r.event_id for r in results}) == 100
    assert length == 100
    assert stored.data["order_id"] == "o-42"


async def test_concurrent_publishes_all_arrive(make_bus: Any) -> None:
    bus = with_orders(make_bus())
    async with bus:
        results = await asyncio.gather(
            *(
                bus.publish(
                    "orders", OrderPlaced(order_id=str(i), total=i), durable=True
                )
                for i in range(300)
            )
        )
        entries = await bus.client.xrange(bus.keys.stream("orders"))
    bodies = {json.loads(fields[b"e"])["id"] for _, fields in entries}
    assert bodies == {r.event_id for r in results}


async def test_event_ids_sort_by_time(make_bus: Any) -> None:
    bus = with_orders(make_bus())
    async with bus:
        first = await bus.publish("orders", OrderPlaced(order_id="a", total=1))
        await asyncio.sleep(0.002)  # ULIDs order by millisecond: step past one
        second = await bus.publish("orders", OrderPlaced(order_id="b", total=1))
    assert first.event_id < second.event_id


async def test_schema_violation_names_field(make_bus: Any) -> None:
    bus = with_orders(make_bus())
    async with bus:
        with pytest.raises(SchemaError, match="total"):
            await bus.publish("orders", {"order_id": "x"}, type="order.placed")


async def test_unknown_type_needs_raw(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        with pytest.raises(UnknownEventTypeError, match="raw=True"):
            await bus.publish("orders", {"a": 1}, type="mystery")
        result = await bus.publish("orders", {"a": 1}, type="mystery", raw=True)
        stored = await bus.get_event(result.event_id)
    assert stored.data == {"a": 1}


async def test_oversized_event_names_size_and_limit(make_bus: Any) -> None:
    bus = make_bus(max_event_bytes=1000)
    async with bus:
        with pytest.raises(EventTooLargeError, match="over the limit of 1000") as info:
            await bus.publish("orders", {"blob": "x" * 2000}, type="big", raw=True)
        keys = [k async for k in bus.client.scan_iter(f"{bus.keys.prefix}:*")]
    assert "max_event_bytes" in str(info.value)
    assert keys == []


@pytest.mark.parametrize(
    "channel", ["", "has space", "a{b}", "x:y", "-lead", "a" * 201]
)
async def test_invalid_channel_is_rejected(make_bus: Any, channel: str) -> None:
    bus = make_bus()
    async with bus:
        with pytest.raises(InvalidChannelError, match="invalid channel name"):
            await bus.publish(channel, {"a": 1}, type="t", raw=True)


async def test_model_without_type_is_rejected(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        with pytest.raises(InvalidEventError, match="register its model"):
            await bus.publish("orders", OrderPlaced(order_id="a", total=1))


async def test_envelope_carries_extensions(make_bus: Any) -> None:
    bus = with_orders(make_bus())
    async with bus:
        result = await bus.publish(
            "orders",
            OrderPlaced(order_id="a", total=1),
            correlation_id="corr-1",
            causation_id="cause-1",
            context_id="ctx-1",
            context_version=3,
            reply_to="svc.replies",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            subject="order/a",
        )
        stored = await bus.get_event(result.event_id)
    assert stored.correlationid == "corr-1"
    assert stored.causationid == "cause-1"
    assert stored.contextid == "ctx-1"
    assert stored.contextversion == 3
    assert stored.replyto == "svc.replies"
    assert stored.subject == "order/a"
    assert stored.traceparent is not None


async def test_cloudevents_sdk_reads_published_json(make_bus: Any) -> None:
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent

    bus = with_orders(make_bus())
    async with bus:
        result = await bus.publish(
            "orders",
            OrderPlaced(order_id="a", total=1.5),
            correlation_id="corr-1",
            subject="order/a",
        )
        body = await bus.client.get(bus.keys.event(result.event_id))
    cloud_event = JSONFormat().read(CloudEvent, body)
    sent = json.loads(body)
    assert cloud_event.get_specversion() == "1.0"
    assert cloud_event.get_id() == result.event_id
    assert cloud_event.get_source() == "svc"
    assert cloud_event.get_type() == "order.placed"
    assert cloud_event.get_subject() == "order/a"
    assert cloud_event.get_datacontenttype() == "application/json"
    assert cloud_event.get_extension("correlationid") == "corr-1"
    assert cloud_event.get_data() == {"order_id": "a", "total": 1.5}
    assert cloud_event.get_time().isoformat()[:19] == sent["time"][:19]
