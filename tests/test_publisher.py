"""The publisher's own pipeline: error replies, cancellation and its connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel
from redis import exceptions as redis_errors

from hivebus import Bus, Event, HivebusError, PublishResult
from tests.conftest import REDIS_URL, delete_prefix, eventually, new_prefix


class Ping(BaseModel):
    n: int


def with_ping(bus: Bus) -> Bus:
    bus.types.register("ping", Ping)
    return bus


async def test_error_reply_fails_its_event_only(make_bus: Any) -> None:
    bus = with_ping(make_bus())
    async with bus:
        await bus.client.set(bus.keys.stream("broken"), "not a stream")
        await bus.client.xgroup_create(
            bus.keys.stream("pings"), "readers", "$", mkstream=True
        )
        # The first publish is sent at once; the next three share one pipeline.
        outcomes = await asyncio.gather(
            bus.publish("pings", Ping(n=0), durable=True),
            bus.publish("pings", Ping(n=1), durable=True),
            bus.publish("broken", Ping(n=2), durable=True),
            bus.publish("pings", Ping(n=3), durable=True),
            return_exceptions=True,
        )
    error = outcomes[2]
    assert isinstance(error, HivebusError)
    assert isinstance(error.__cause__, redis_errors.ResponseError)
    assert "WRONGTYPE" in str(error)
    assert [r.groups for r in outcomes if isinstance(r, PublishResult)] == [1, 1, 1]


async def test_cancelled_publishes_keep_replies_aligned(make_bus: Any) -> None:
    bus = with_ping(make_bus())

    @bus.subscribe("pings.live")
    async def listener(event: Event[Ping]) -> None:
        pass

    async with bus:
        await bus.client.xgroup_create(
            bus.keys.stream("pings"), "one", "$", mkstream=True
        )
        for group in ("one", "two", "three"):
            await bus.client.xgroup_create(
                bus.keys.stream("pings.three"), group, "$", mkstream=True
            )
        counts = []
        for n in range(60):
            durable = n % 2 == 0
            channel = "pings" if durable else "pings.live"
            task = asyncio.create_task(bus.publish(channel, Ping(n=n), durable=durable))
            # Step the loop 0-5 times, so the cancel lands before the send,
            # while the reply is awaited, or after it arrived.
            for _ in range(n % 6):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            # A reply left over from the cancelled publish would be read
            # here instead of this publish's own, and give another count.
            check = await bus.publish("pings.three", Ping(n=n), durable=True)
            counts.append(check.groups)
    assert counts == [3] * 60


async def client_count(client: Any, name: str) -> int:
    clients = await client.client_list()
    return sum(1 for c in clients if c.get("name") == name)


@pytest.mark.redis_only
async def test_cancelled_publishes_leak_no_connection() -> None:
    prefix = new_prefix()
    bus = with_ping(Bus(REDIS_URL, prefix=prefix, service="svc"))
    name = f"hivebus:svc:{bus.process_id}:publisher"
    async with bus:
        try:
            await bus.publish("pings", Ping(n=0))
            first = await client_count(bus.client, name)
            for n in range(200):
                task = asyncio.create_task(bus.publish("pings", Ping(n=n)))
                for _ in range(n % 6):
                    await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await bus.publish("pings", Ping(n=1000))

            # Redis drops a closed connection from CLIENT LIST on its next loop.
            async def one_left() -> bool:
                return await client_count(bus.client, name) == 1

            await eventually(one_left, what="one publisher connection")
        finally:
            await delete_prefix(bus.client, prefix)
    assert first == 1
