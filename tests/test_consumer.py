"""Durable delivery in one process: acks, groups, limits, leases and takeovers."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from hivebus import Bus, Delivery, Event, RetryLater, RetryPolicy
from tests.conftest import eventually

CHANNEL = "jobs"
GROUP = "svc"


class Job(BaseModel):
    n: int


class Note(BaseModel):
    text: str


def with_jobs(bus: Bus) -> Bus:
    bus.types.register("job.created", Job)
    bus.types.register("note.added", Note)
    return bus


async def pending(bus: Bus, group: str = GROUP, stream: str | None = None) -> int:
    """Return the number of entries pending in ``group`` on the jobs stream."""
    info = await bus.client.xpending(stream or bus.keys.stream(CHANNEL), group)
    return int(info["pending"])


async def read_as_ghost(bus: Bus, count: int) -> list[str]:
    """Read ``count`` entries as a consumer that then dies, leaving them pending."""
    reply = await bus.client.xreadgroup(
        GROUP, "ghost", {bus.keys.stream(CHANNEL): ">"}, count=count
    )
    return [entry_id.decode() for _, rows in reply for entry_id, _ in rows]


async def test_handler_receives_typed_event(make_bus: Any) -> None:
    bus = with_jobs(make_bus())
    received: asyncio.Queue[Event[Job]] = asyncio.Queue()

    @bus.subscribe(CHANNEL, durable=True)
    async def on_job(event: Event[Job]) -> None:
        await received.put(event)

    async with bus:
        result = await bus.publish(CHANNEL, Job(n=7), durable=True)
        event = await asyncio.wait_for(received.get(), 10)
    assert event.id == result.event_id
    assert event.type == "job.created"
    assert isinstance(event.data, Job)
    assert event.data.n == 7


async def test_ack_waits_for_handler(make_bus: Any) -> None:
    bus = with_jobs(make_bus())
    started = asyncio.Event()
    release = asyncio.Event()

    @bus.subscribe(CHANNEL, durable=True)
    async def on_job(event: Event[Job]) -> None:
        started.set()
        await release.wait()

    async with bus:
        await bus.publish(CHANNEL, Job(n=1), durable=True)
        await asyncio.wait_for(started.wait(), 10)
        assert await pending(bus) == 1
        release.set()

        async def acked() -> bool:
            return await pending(bus) == 0

        await eventually(acked, what="ack after the handler returned")


async def test_each_group_gets_every_event(make_bus: Any) -> None:
    bus = with_jobs(make_bus())
    seen: dict[str, set[int]] = {"audit": set(), "billing": set()}

    for group in seen:

        @bus.subscribe(CHANNEL, durable=True, group=group)
        async def on_job(event: Event[Job], delivery: Delivery) -> None:
            seen[delivery.subscription.split("/")[1]].add(event.data.n)

    async with bus:
        await bus.publish_many(CHANNEL, [Job(n=i) for i in range(5)], durable=True)
        await eventually(
            lambda: all(len(s) == 5 for s in seen.values()), what="both groups"
        )
    assert seen["audit"] == set(range(5))
    assert seen["billing"] == set(range(5))


async def test_group_members_share_work(make_bus: Any) -> None:
    """Two processes with concurrency 2 can hold 4 entries only by sharing them."""
    held: dict[str, list[int]] = {"a": [], "b": []}
    all_held = asyncio.Event()
    buses = []

    def holder(name: str) -> Any:
        async def on_job(event: Event[Job]) -> None:
            held[name].append(event.data.n)
            if sum(len(v) for v in held.values()) == 4:
                all_held.set()
            await all_held.wait()

        return on_job

    for name in held:
        bus = with_jobs(make_bus(consumer_name=f"member-{name}"))
        bus.subscribe(CHANNEL, durable=True, group="workers", concurrency=2)(
            holder(name)
        )
        buses.append(bus)
    for bus in buses:
        await bus.start()
    await buses[0].publish_many(CHANNEL, [Job(n=i) for i in range(4)], durable=True)
    await asyncio.wait_for(all_held.wait(), 10)

    async def settled() -> bool:
        return await pending(buses[0], "workers") == 0

    await eventually(settled, what="all entries acked")
    assert len(held["a"]) == 2
    assert len(held["b"]) == 2
    assert sorted(held["a"] + held["b"]) == [0, 1, 2, 3]


async def test_concurrency_limit_is_respected(make_bus: Any) -> None:
    bus = with_jobs(make_bus())
    running = 0
    peak = 0
    full = asyncio.Event()
    handled: set[int] = set()

    @bus.subscribe(CHANNEL, durable=True, concurrency=3, batch=10)
    async def on_job(event: Event[Job]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 3:
            full.set()
        await full.wait()
        handled.add(event.data.n)
        running -= 1

    async with bus:
        await bus.publish_many(CHANNEL, [Job(n=i) for i in range(12)], durable=True)
        await eventually(lambda: len(handled) == 12, what="all 12 handled")
    assert peak == 3


async def test_limit_counts_retries_and_new(make_bus: Any) -> None:
    """Due retries and new entries are read together without passing the limit."""
    bus = with_jobs(make_bus())
    running = 0
    peak = 0
    handled: set[int] = set()
    gate = asyncio.Event()

    @bus.subscribe(
        CHANNEL, durable=True, concurrency=4, retry=RetryPolicy(base=0.01, cap=0.01)
    )
    async def on_job(event: Event[Job], delivery: Delivery) -> None:
        nonlocal running, peak
        if event.data.n < 6 and delivery.attempt == 1:
            raise RetryLater("first attempt of the early ones", delay=0)
        running += 1
        peak = max(peak, running)
        await gate.wait()
        handled.add(event.data.n)
        running -= 1

    async with bus:
        await bus.publish_many(CHANNEL, [Job(n=i) for i in range(12)], durable=True)
        await eventually(lambda: running == 4, what="limit reached")
        gate.set()
        await eventually(lambda: len(handled) == 12, what="all 12 handled")
    assert peak == 4


async def test_types_filter_acks_others(make_bus: Any) -> None:
    bus = with_jobs(make_bus())
    received: list[str] = []

    @bus.subscribe(CHANNEL, durable=True, types=["job.created"])
    async def on_job(event: Event[Any]) -> None:
        received.append(event.type)

    async with bus:
        await bus.publish(CHANNEL, Note(text="skip me"), durable=True)
        await bus.publish(CHANNEL, Job(n=1), durable=True)
        await eventually(lambda: received == ["job.created"], what="job handled")

        async def acked() -> bool:
            return await pending(bus) == 0

        await eventually(acked, what="filtered event acked")
    assert received == ["job.created"]


async def test_delivery_attempt_counts_retries(make_bus: Any) -> None:
    bus = with_jobs(make_bus())
    seen: list[tuple[int, int]] = []

    @bus.subscribe(CHANNEL, durable=True, retry=RetryPolicy(base=0.01, cap=0.01))
    async def on_job(event: Event[Job], delivery: Delivery) -> None:
        seen.append((delivery.attempt, delivery.delivery_count))
        if delivery.attempt == 1:
            raise RetryLater("try again", delay=0.05)

    async with bus:
        await bus.publish(CHANNEL, Job(n=1), durable=True)
        await eventually(lambda: len(seen) == 2, what="second attempt")
        redo = bus.consumers[0].redo

        async def redo_empty() -> bool:
            return int(await bus.client.xlen(redo)) == 0

        await eventually(redo_empty, what="redo entry deleted after its ack")
    assert seen == [(1, 1), (2, 1)]


async def test_cancelled_handler_stays_pending(make_bus: Any) -> None:
    """A handler cut off at shutdown leaves its entry for the next consumer."""
    first = with_jobs(make_bus())
    started = asyncio.Event()

    @first.subscribe(CHANNEL, durable=True)
    async def stuck(event: Event[Job]) -> None:
        started.set()
        await asyncio.Event().wait()

    await first.start()
    await first.publish(CHANNEL, Job(n=1), durable=True)
    await asyncio.wait_for(started.wait(), 10)
    await first.stop(drain_timeout=0.1)

    second = with_jobs(make_bus())
    redelivered: asyncio.Queue[Delivery] = asyncio.Queue()

    @second.subscribe(CHANNEL, durable=True)
    async def finish(event: Event[Job], delivery: Delivery) -> None:
        await redelivered.put(delivery)

    await second.connect()
    assert await pending(second) == 1
    await second.start()
    delivery = await asyncio.wait_for(redelivered.get(), 10)
    assert delivery.event.data.n == 1
    assert delivery.delivery_count == 2
    assert delivery.attempt == 2

    async def acked() -> bool:
        return await pending(second) == 0

    await eventually(acked, what="redelivered entry acked")


async def test_graceful_stop_finishes_in_flight(make_bus: Any) -> None:
    bus = with_jobs(make_bus())
    started = asyncio.Event()
    release = asyncio.Event()
    finished: list[int] = []

    @bus.subscribe(CHANNEL, durable=True)
    async def on_job(event: Event[Job]) -> None:
        started.set()
        await release.wait()
        finished.append(event.data.n)

    await bus.start()
    await bus.publish(CHANNEL, Job(n=1), durable=True)
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.create_task(bus.stop(drain_timeout=10))
    await asyncio.wait({stopping}, timeout=0.3)
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 10)
    assert finished == [1]

    checker = make_bus()
    await checker.connect()
    assert await pending(checker) == 0


async def test_lease_outlives_claim_timeout(make_bus: Any) -> None:
    """A handler that runs for several claim timeouts is never run twice."""
    starts: dict[int, int] = {}
    done: set[int] = set()
    buses = []
    for name in ("a", "b"):
        bus = with_jobs(make_bus(consumer_name=f"lease-{name}"))

        @bus.subscribe(CHANNEL, durable=True, claim_timeout=0.4, concurrency=1)
        async def slow(event: Event[Job]) -> None:
            starts[event.data.n] = starts.get(event.data.n, 0) + 1
            await asyncio.sleep(1.5)  # the work itself: about 4 claim timeouts
            done.add(event.data.n)

        buses.append(bus)
    for bus in buses:
        await bus.start()
    await buses[0].publish_many(CHANNEL, [Job(n=i) for i in range(2)], durable=True)
    await eventually(lambda: len(done) == 2, timeout=15, what="both handled")
    assert starts == {0: 1, 1: 1}
    assert sum(c.stats.claimed for b in buses for c in b.consumers) == 0


async def test_stale_entry_claimed_with_count(make_bus: Any) -> None:
    bus = with_jobs(make_bus())
    seen: asyncio.Queue[Delivery] = asyncio.Queue()

    @bus.subscribe(CHANNEL, durable=True, claim_timeout=0.2)
    async def on_job(event: Event[Job], delivery: Delivery) -> None:
        await seen.put(delivery)

    await bus.connect()
    await bus.client.xgroup_create(bus.keys.stream(CHANNEL), GROUP, "0", mkstream=True)
    await bus.publish(CHANNEL, Job(n=1), durable=True)
    [ghost_id] = await read_as_ghost(bus, 1)
    await bus.start()
    delivery = await asyncio.wait_for(seen.get(), 10)
    assert delivery.entry_id == ghost_id
    assert delivery.delivery_count == 2
    assert delivery.attempt == 2
    assert bus.consumers[0].stats.claimed == 1


async def test_suspects_run_alone_fewest_first(make_bus: Any) -> None:
    """Entries of a dead consumer run one at a time, lowest delivery count first."""
    bus = with_jobs(make_bus())
    order: list[int] = []
    running = 0
    peak = 0

    @bus.subscribe(CHANNEL, durable=True, claim_timeout=0.2, concurrency=8)
    async def on_job(event: Event[Job]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        order.append(event.data.n)
        await asyncio.sleep(0.05)  # long enough for a second run to overlap
        running -= 1

    await bus.connect()
    stream = bus.keys.stream(CHANNEL)
    await bus.client.xgroup_create(stream, GROUP, "0", mkstream=True)
    await bus.publish_many(CHANNEL, [Job(n=i) for i in range(3)], durable=True)
    ids = await read_as_ghost(bus, 3)
    for _ in range(2):
        await bus.client.xclaim(stream, GROUP, "ghost", 0, [ids[0]])
    await bus.start()
    await eventually(lambda: len(order) == 3, what="three suspects handled")
    assert order == [1, 2, 0]
    assert peak == 1


async def test_trimmed_stale_entry_dead_lettered(make_bus: Any) -> None:
    bus = with_jobs(make_bus())

    @bus.subscribe(CHANNEL, durable=True, claim_timeout=0.2)
    async def on_job(event: Event[Job]) -> None:
        raise AssertionError("a trimmed entry has no event to handle")

    await bus.connect()
    stream = bus.keys.stream(CHANNEL)
    await bus.client.xgroup_create(stream, GROUP, "0", mkstream=True)
    await bus.publish(CHANNEL, Job(n=1), durable=True)
    [ghost_id] = await read_as_ghost(bus, 1)
    await bus.client.xtrim(stream, maxlen=0)
    await bus.start()

    async def reported() -> bool:
        return await bus.dlq.count(CHANNEL) == 1

    await eventually(reported, what="trimmed entry dead-lettered")
    [letter] = await bus.dlq.entries(channel=CHANNEL)
    assert "entry trimmed before ack" in letter.reason
    assert letter.origin_id == ghost_id
    assert await pending(bus) == 0


async def test_trimmed_held_entry_keeps_body(make_bus: Any) -> None:
    """An entry trimmed under a handler cut off at shutdown is dead-lettered whole."""
    bus = with_jobs(make_bus())
    started = asyncio.Event()

    @bus.subscribe(CHANNEL, durable=True)
    async def stuck(event: Event[Job]) -> None:
        started.set()
        await asyncio.Event().wait()

    await bus.start()
    result = await bus.publish(CHANNEL, Job(n=1), durable=True)
    await asyncio.wait_for(started.wait(), 10)
    await bus.client.xtrim(bus.keys.stream(CHANNEL), maxlen=0)
    await bus.stop(drain_timeout=0.1)

    checker = make_bus()
    await checker.connect()
    [letter] = await checker.dlq.entries(channel=CHANNEL)
    assert "entry trimmed before ack" in letter.reason
    assert letter.event_id == result.event_id
    assert await pending(checker) == 0


async def test_trim_stops_at_pending_entry(make_bus: Any) -> None:
    bus = with_jobs(make_bus(stream_retention=0.3))
    held = asyncio.Event()
    release = asyncio.Event()
    handled: set[int] = set()

    @bus.subscribe(CHANNEL, durable=True)
    async def on_job(event: Event[Job]) -> None:
        if event.data.n == 1:
            held.set()
            await release.wait()
        handled.add(event.data.n)

    async with bus:
        results = [await bus.publish(CHANNEL, Job(n=i), durable=True) for i in range(3)]
        await asyncio.wait_for(held.wait(), 10)
        await eventually(lambda: handled == {0, 2}, what="0 and 2 handled")
        consumer = bus.consumers[0]
        stream = consumer.stream

        async def trimmed_once() -> bool:
            await consumer.trim()
            return int(await bus.client.xlen(stream)) == 2

        await eventually(trimmed_once, what="entry 0 trimmed by age")
        first = await bus.client.xrange(stream, count=1)
        assert pending_ids(first) == [await entry_id_of(bus, results[1].event_id)]
        release.set()
        await eventually(lambda: handled == {0, 1, 2}, what="held entry handled")


def pending_ids(rows: Any) -> list[str]:
    return [row_id.decode() for row_id, _ in rows]


async def entry_id_of(bus: Bus, event_id: str) -> str:
    """Return the stream entry id that carries ``event_id``."""
    for row_id, fields in await bus.client.xrange(bus.keys.stream(CHANNEL)):
        if event_id.encode() in fields[b"e"]:
            return str(row_id.decode())
    raise AssertionError(f"no entry carries event {event_id}")


async def test_bad_retry_member_dead_lettered(make_bus: Any) -> None:
    """A retry set member that is not hivebus JSON reaches the DLQ, not a loop."""
    bus = with_jobs(make_bus())
    handled: list[int] = []

    @bus.subscribe(CHANNEL, durable=True)
    async def on_job(event: Event[Job]) -> None:
        handled.append(event.data.n)

    async with bus:
        retry_set = bus.consumers[0].retry_set
        await bus.client.zadd(retry_set, {"not json": 0})

        async def reported() -> bool:
            return await bus.dlq.count(CHANNEL) == 1

        await eventually(reported, what="bad member dead-lettered")
        await bus.publish(CHANNEL, Job(n=5), durable=True)
        await eventually(lambda: handled == [5], what="consumer still handles")
    [letter] = await bus.dlq.entries(channel=CHANNEL)
    assert letter.reason.startswith("undecodable entry")
