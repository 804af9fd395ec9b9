"""Broadcast delivery: fan-out, channel patterns, failing handlers, bad messages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

from hivebus import Bus, Event
from hivebus.connection import memory_server
from hivebus.dlq import BROADCAST_SUBSCRIPTION_PREFIX
from hivebus.errors import ListenerClosedError
from tests.conftest import eventually


@pytest.fixture
async def plain_client(url: str) -> AsyncIterator[Any]:
    """A plain redis-py client on the test's backend, bypassing hivebus."""
    if url.startswith("memory://"):
        client: Any = fakeredis.FakeAsyncRedis(server=memory_server(url))
    else:
        client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


def collect(bus: Bus, channel: str, seen: list[str]) -> None:
    """Subscribe a handler to ``channel`` that records each event id."""

    @bus.subscribe(channel, raw=True)
    async def record(event: Event[Any]) -> None:
        seen.append(event.id)


async def test_every_listener_gets_every_event(make_bus: Any) -> None:
    listeners = [make_bus(service=f"svc{i}") for i in range(3)]
    seen: list[list[str]] = [[] for _ in listeners]
    for bus, ids in zip(listeners, seen, strict=True):
        collect(bus, "status", ids)
    publisher = make_bus()
    for bus in listeners:
        await bus.start()

    results = [
        await publisher.publish("status", {"n": n}, type="status", raw=True)
        for n in range(20)
    ]
    sent = [r.event_id for r in results]
    await eventually(
        lambda: all(len(ids) == 20 for ids in seen), what="20 events per listener"
    )

    for ids in seen:
        assert sorted(ids) == sorted(sent)
    assert {r.listeners for r in results} == {3}


async def test_two_subscriptions_in_one_bus(make_bus: Any) -> None:
    bus = make_bus()
    first: list[str] = []
    second: list[str] = []
    collect(bus, "status", first)
    collect(bus, "status", second)
    async with bus:
        result = await bus.publish("status", {"n": 1}, type="status", raw=True)
        await eventually(lambda: first and second, what="both handlers called")
    assert first == [result.event_id]
    assert second == [result.event_id]


async def test_pattern_matches_only_its_channels(make_bus: Any) -> None:
    bus = make_bus()
    matched: list[tuple[str, str]] = []

    @bus.subscribe("orders.*", raw=True)
    async def on_order(event: Event[Any]) -> None:
        matched.append((event.id, event.data["channel"]))

    publisher = make_bus()
    async with bus:
        for channel in ("orders.created", "invoices.created", "orders.paid"):
            await publisher.publish(
                channel, {"channel": channel}, type="probe", raw=True
            )
        last = await publisher.publish(
            "orders.shipped", {"channel": "orders.shipped"}, type="probe", raw=True
        )
        await eventually(
            lambda: last.event_id in {i for i, _ in matched}, what="last event"
        )
    channels = [channel for _, channel in matched]
    assert channels == ["orders.created", "orders.paid", "orders.shipped"]


async def test_handler_error_logged_listener_continues(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bus = make_bus()
    handled: list[int] = []

    @bus.subscribe("jobs", raw=True, concurrency=1)
    async def fragile(event: Event[Any]) -> None:
        if event.data["n"] == 1:
            raise ValueError("boom on n=1")
        handled.append(event.data["n"])

    async with bus:
        bad = await bus.publish("jobs", {"n": 1}, type="job", raw=True)
        await bus.publish("jobs", {"n": 2}, type="job", raw=True)
        await eventually(lambda: handled == [2], what="event after the failure")

    failures = [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR and "handler failed" in r.getMessage()
    ]
    assert len(failures) == 1
    assert f"event_id={bad.event_id}" in failures[0].getMessage()
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], ValueError)


async def test_malformed_message_is_dead_lettered(
    make_bus: Any, plain_client: Any
) -> None:
    bus = make_bus()
    handled: list[str] = []
    collect(bus, "status", handled)
    async with bus:
        receivers = await plain_client.publish(
            bus.keys.broadcast("status"), b"{not json"
        )
        good = await bus.publish("status", {"n": 1}, type="status", raw=True)
        await eventually(lambda: handled, what="valid event after a bad one")
        await eventually(
            lambda: bus.dlq.count("status"), what="dead letter for the bad message"
        )
        entries = await bus.dlq.entries(channel="status")

    assert receivers == 1
    assert handled == [good.event_id]
    assert len(entries) == 1
    assert entries[0].body == "{not json"
    assert entries[0].subscription == BROADCAST_SUBSCRIPTION_PREFIX + "svc"
    assert entries[0].reason.startswith("undecodable entry")


async def test_listener_survives_handler_timeout(make_bus: Any) -> None:
    bus = make_bus()
    handled: list[int] = []
    release = asyncio.Event()

    @bus.subscribe("slow", raw=True, concurrency=1, handler_timeout=0.1)
    async def slow(event: Event[Any]) -> None:
        if event.data["n"] == 1:
            await release.wait()
        handled.append(event.data["n"])

    async with bus:
        await bus.publish("slow", {"n": 1}, type="job", raw=True)
        await bus.publish("slow", {"n": 2}, type="job", raw=True)
        await eventually(lambda: handled == [2], what="event after a timeout")
    assert not release.is_set()


async def test_listen_receives_published_events(make_bus: Any) -> None:
    bus = make_bus()
    publisher = make_bus()
    async with bus, bus.listen("status", raw=True) as events:
        sent = await publisher.publish("status", {"n": 1}, type="status", raw=True)
        received = await asyncio.wait_for(events.get(), 5)
    assert received.id == sent.event_id
    assert received.data == {"n": 1}
    assert sent.listeners == 1


async def test_listen_pattern_skips_bad_message(
    make_bus: Any, plain_client: Any
) -> None:
    bus = make_bus()
    async with bus, bus.listen("orders.*", raw=True) as events:
        await plain_client.publish(bus.keys.broadcast("orders.created"), b"junk")
        await bus.publish("invoices.created", {"n": 1}, type="probe", raw=True)
        sent = await bus.publish("orders.paid", {"n": 2}, type="probe", raw=True)
        received = await asyncio.wait_for(events.get(), 5)
    assert received.id == sent.event_id


async def test_listen_unsubscribes_on_exit(make_bus: Any, plain_client: Any) -> None:
    bus = make_bus()
    name = bus.keys.broadcast("temp")
    async with bus:
        async with bus.listen("temp"):
            inside = dict(await plain_client.pubsub_numsub(name))
        await eventually(
            lambda: _numsub(plain_client, name, 0), what="unsubscribe on exit"
        )
    assert inside[name.encode()] == 1


async def test_cancelled_listen_unsubscribes(make_bus: Any, plain_client: Any) -> None:
    bus = make_bus()
    name = bus.keys.broadcast("temp")
    entered = asyncio.Event()

    async def wait_forever() -> None:
        async with bus.listen("temp") as events:
            entered.set()
            await events.get()

    async with bus:
        task = asyncio.create_task(wait_forever())
        await asyncio.wait_for(entered.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(
            lambda: _numsub(plain_client, name, 0), what="unsubscribe on cancel"
        )


async def test_listen_shares_channel_with_subscription(
    make_bus: Any, plain_client: Any
) -> None:
    bus = make_bus()
    handled: list[str] = []
    collect(bus, "status", handled)
    name = bus.keys.broadcast("status")
    async with bus:
        async with bus.listen("status", raw=True) as events:
            first = await bus.publish("status", {"n": 1}, type="status", raw=True)
            assert (await asyncio.wait_for(events.get(), 5)).id == first.event_id
        second = await bus.publish("status", {"n": 2}, type="status", raw=True)
        await eventually(lambda: len(handled) == 2, what="both events handled")
        subscribers = dict(await plain_client.pubsub_numsub(name))
    assert handled == [first.event_id, second.event_id]
    assert subscribers[name.encode()] == 1


async def _numsub(client: Any, name: str, expected: int) -> bool:
    counts = dict(await client.pubsub_numsub(name))
    return bool(counts.get(name.encode(), 0) == expected)


async def test_bus_stop_ends_listen(make_bus: Any) -> None:
    bus = make_bus()
    received: list[str] = []
    entered = asyncio.Event()

    async def read_all() -> None:
        async with bus.listen("status", raw=True) as events:
            entered.set()
            async for event in events:
                received.append(event.id)

    async with bus:
        reader = asyncio.create_task(read_all())
        await asyncio.wait_for(entered.wait(), 5)
        sent = await bus.publish("status", {"n": 1}, type="status", raw=True)
        await eventually(lambda: received, what="event read")
    await asyncio.wait_for(reader, 5)

    assert received == [sent.event_id]


async def test_get_after_stop_raises(make_bus: Any) -> None:
    bus = make_bus()
    async with bus.listen("status", raw=True) as events:
        await bus.stop()
        with pytest.raises(ListenerClosedError, match="bus stopped") as info:
            await events.get()
    assert "'status'" in str(info.value)
