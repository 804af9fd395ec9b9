"""Durable delivery under faults: killed workers, long handlers, trims, poison.

The worker processes are ``tests/workers/durable_worker.py``; each test
reads what their handlers recorded under ``PREFIX:t:`` in the shared Redis.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from hivebus import Bus, DeadLetterEntry, Event
from tests.conftest import REDIS_URL, delete_prefix, eventually
from tests.workers.control import Supervisor, Worker
from tests.workers.durable_worker import JOB_TYPE, Job

CHANNEL = "work"
GROUP = "workers"

pytestmark = pytest.mark.redis_only


class Scene:
    """One test's workers, publisher and view of the keys the handlers write."""

    def __init__(self, prefix: str, logs: Path, client: aioredis.Redis) -> None:
        self.prefix = prefix
        self.logs = logs
        self.redis = client
        self.workers: list[Worker] = []
        self.supervisors: list[Supervisor] = []
        self.bus = Bus(REDIS_URL, prefix=prefix, service="tester")
        self.bus.types.register(JOB_TYPE, Job)
        self.stream = self.bus.keys.stream(CHANNEL)

    def key(self, name: str) -> str:
        return f"{self.prefix}:t:{name}"

    def worker(self, **options: Any) -> Worker:
        """Return a worker on this test's prefix and channel (not started)."""
        name = f"worker-{len(self.workers)}.log"
        settings = {"url": REDIS_URL, "prefix": self.prefix, "channel": CHANNEL}
        worker = Worker(self.logs / name, **settings, **options)
        self.workers.append(worker)
        return worker

    def supervise(self, worker: Worker) -> Supervisor:
        """Start ``worker`` under a supervisor that restarts it when it exits."""
        supervisor = Supervisor(worker)
        supervisor.start()
        self.supervisors.append(supervisor)
        return supervisor

    async def wait_started(self, count: int, timeout: float = 15) -> None:
        """Wait until ``count`` worker starts have been recorded in total."""

        async def started() -> bool:
            return int(await self.redis.get(self.key("started")) or 0) >= count

        await eventually(started, timeout=timeout, what=f"{count} worker starts")

    async def publish(self, jobs: list[Job]) -> None:
        await self.bus.publish_many(CHANNEL, jobs, durable=True)

    async def handled(self) -> set[str]:
        return {m.decode() for m in await self.redis.smembers(self.key("handled"))}

    async def count_handled(self) -> int:
        return int(await self.redis.scard(self.key("handled")))

    async def counts(self, name: str) -> dict[str, int]:
        """Return a hash of per-event counters (starts or effects)."""
        raw = await self.redis.hgetall(self.key(name))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def runs(self) -> list[tuple[str, int, int, int]]:
        """Return every handler run as (id, attempt, delivery count, unix ms)."""
        rows = await self.redis.lrange(self.key("runs"), 0, -1)
        parsed = []
        for row in rows:
            job_id, attempt, count, at_ms = row.decode().split("|")
            parsed.append((job_id, int(attempt), int(count), int(at_ms)))
        return parsed

    async def pending(self, stream: str | None = None) -> int:
        info = await self.redis.xpending(stream or self.stream, GROUP)
        return int(info["pending"])

    async def redo_pending(self) -> int:
        return await self.pending(self.bus.keys.redo(CHANNEL, GROUP))

    async def dead_letters(self) -> int:
        return int(await self.redis.xlen(self.bus.keys.dlq(CHANNEL)))

    async def close(self) -> None:
        for supervisor in self.supervisors:
            await supervisor.stop()
        for worker in self.workers:
            worker.kill()
        await self.bus.stop(drain_timeout=1)


@pytest.fixture
async def scene(
    prefix: str, tmp_path: Path, raw_redis: aioredis.Redis
) -> AsyncIterator[Scene]:
    setup = Scene(prefix, tmp_path, raw_redis)
    await setup.bus.connect()
    try:
        yield setup
    finally:
        await setup.close()
        await delete_prefix(raw_redis, prefix)


def event_id_of(letter: DeadLetterEntry) -> str:
    """Return the job id inside a dead letter's event."""
    event = letter.event or {}
    return str(event.get("data", {}).get("id", ""))


def jobs(count: int, start: int = 0, **fields: Any) -> list[Job]:
    return [Job(id=f"e{i:04d}", **fields) for i in range(start, start + count)]


async def wait_for(
    check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.02
) -> None:
    await eventually(check, timeout=timeout, what=what, interval=interval)


# -- a killed consumer's entries ----------------------------------------------


@pytest.mark.slow
async def test_killed_consumer_work_finished(scene: Scene) -> None:
    """A SIGKILLed consumer's unacked entries are finished by a new consumer."""
    first = scene.worker(concurrency=10, claim_timeout=2, sleep=0.05)
    first.start()
    await scene.wait_started(1)
    await scene.publish(jobs(200))

    async def holding() -> bool:
        return await scene.count_handled() >= 50 and await scene.pending() > 0

    await wait_for(holding, timeout=20, what="first consumer holding entries")
    first.kill()
    assert await scene.pending() > 0

    scene.worker(concurrency=10, claim_timeout=2, sleep=0.05).start()

    async def finished() -> bool:
        return await scene.count_handled() == 200 and await scene.pending() == 0

    await wait_for(finished, timeout=30, what="all 200 handled by the second")
    assert await scene.handled() == {job.id for job in jobs(200)}
    assert await scene.pending() == 0
    assert await scene.dead_letters() == 0


# -- claim timeout shorter than a handler -------------------------------------


@pytest.mark.slow
async def test_long_handler_keeps_lease(scene: Scene) -> None:
    """Six 7 s handlers under a 2 s claim timeout each run exactly once."""
    for _ in range(3):
        scene.worker(concurrency=2, claim_timeout=2, sleep=7, effect=1).start()
    await scene.wait_started(3)
    started_at = time.monotonic()
    await scene.publish(jobs(6))

    async def finished() -> bool:
        return await scene.count_handled() == 6

    await wait_for(finished, timeout=20, what="six long handlers finished")
    wall = time.monotonic() - started_at
    expected = {job.id: 1 for job in jobs(6)}
    assert await scene.counts("starts") == expected
    assert await scene.counts("effects") == expected
    assert wall < 20
    assert await scene.pending() == 0
    assert await scene.dead_letters() == 0


@pytest.mark.slow
async def test_kill_after_effect_no_double(scene: Scene) -> None:
    """A worker killed after its side effect but before the ack: effect stays 1.

    Scaled down from six events to three (one per worker, concurrency 1), so
    that the redelivered 7 s handlers run in one wave.
    """
    for _ in range(3):
        worker = scene.worker(
            concurrency=1, claim_timeout=2, sleep=7, effect=1, exit_after_effect=1
        )
        scene.supervise(worker)
    await scene.wait_started(3)
    await scene.publish(jobs(3))

    async def finished() -> bool:
        return await scene.count_handled() == 3 and await scene.pending() == 0

    await wait_for(finished, timeout=40, what="three redelivered handlers")
    ids = [job.id for job in jobs(3)]
    assert await scene.counts("effects") == dict.fromkeys(ids, 1)
    assert await scene.counts("starts") == dict.fromkeys(ids, 2)
    assert sum(s.restarts for s in scene.supervisors) == 3
    assert await scene.pending() == 0
    assert await scene.dead_letters() == 0


# -- worker killed mid-batch --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("successor", ["new-name", "old-name"])
async def test_killed_mid_batch_resumed(scene: Scene, successor: str) -> None:
    """1,000 events; the worker dies past 500; a successor finishes them all."""
    options = {"concurrency": 10, "batch": 10, "claim_timeout": 3, "sleep": 0.005}
    first = scene.worker(consumer="mid-batch-a", **options)
    first.start()
    await scene.wait_started(1)
    for start in range(0, 1000, 250):
        await scene.publish(jobs(250, start))

    async def half_done() -> bool:
        return await scene.count_handled() >= 500 and await scene.pending() <= 20

    await wait_for(half_done, timeout=60, what="500 handled, at most 20 pending")
    first.kill()
    name = "mid-batch-b" if successor == "new-name" else "mid-batch-a"
    scene.worker(consumer=name, **options).start()
    await scene.wait_started(2)
    resumed_at = time.monotonic()

    async def finished() -> bool:
        return await scene.count_handled() == 1000 and await scene.pending() == 0

    await wait_for(finished, timeout=2 * 3 + 5 + 5, what="all 1,000 handled")
    assert time.monotonic() - resumed_at < 2 * 3 + 5
    assert await scene.handled() == {job.id for job in jobs(1000)}
    assert await scene.pending() == 0
    assert await scene.dead_letters() == 0

    starts = await scene.counts("starts")
    duplicates = {job_id for job_id, count in starts.items() if count > 1}
    assert len(duplicates) <= 20
    counts_seen = {job_id: 0 for job_id in duplicates}
    for job_id, _, count, _ in await scene.runs():
        if job_id in duplicates:
            counts_seen[job_id] = max(counts_seen[job_id], count)
    assert all(count >= 2 for count in counts_seen.values()), counts_seen


# -- trimming never drops pending entries -------------------------------------


class Holder:
    """A handler that acks events 1-50 and 101-200 and blocks on 51-100."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.handled: set[int] = set()
        self.held: set[int] = set()
        self.empty_data = 0

    async def handle(self, event: Event[Job]) -> None:
        if event.data is None:
            self.empty_data += 1
            return
        number = int(event.data.id[1:])
        if 51 <= number <= 100:
            self.held.add(number)
            await self.release.wait()
        self.handled.add(number)


async def holding_bus(scene: Scene, holder: Holder) -> Bus:
    bus = Bus(REDIS_URL, prefix=scene.prefix, service=GROUP, stream_retention=5)
    bus.types.register(JOB_TYPE, Job)
    bus.subscribe(CHANNEL, durable=True, claim_timeout=2, concurrency=64)(holder.handle)
    await bus.start()
    await scene.publish([Job(id=f"e{i:04d}") for i in range(1, 101)])
    await wait_for(
        lambda: len(holder.handled) == 50 and len(holder.held) == 50,
        timeout=10,
        what="1-50 handled and 51-100 held",
    )
    return bus


@pytest.mark.slow
async def test_trim_spares_pending_entries(scene: Scene) -> None:
    """Age trims over 12 s remove acked entries but never the 50 held ones."""
    holder = Holder()
    bus = await holding_bus(scene, holder)
    consumer = bus.consumers[0]
    try:
        for start in range(101, 201, 10):
            await scene.publish([Job(id=f"e{i:04d}") for i in range(start, start + 10)])
            await asyncio.sleep(1.2)  # spread publishing over 12 s of stream age
            await consumer.trim()
        _, first_fields = (await scene.redis.xrange(scene.stream, count=1))[0]
        assert b'"e0051"' in first_fields[b"e"]
        holder.release.set()
        await wait_for(
            lambda: len(holder.handled) == 200, timeout=10, what="200 handled"
        )
    finally:
        await bus.stop(drain_timeout=2)
    assert len(holder.handled) + await scene.dead_letters() == 200
    assert await scene.dead_letters() == 0
    assert await scene.pending() == 0
    assert holder.empty_data == 0


@pytest.mark.slow
async def test_manual_trim_reports_pending(scene: Scene) -> None:
    """An operator's XTRIM MAXLEN 10 under held entries: they are dead-lettered."""
    holder = Holder()
    bus = await holding_bus(scene, holder)
    await scene.publish([Job(id=f"e{i:04d}") for i in range(101, 201)])
    await wait_for(lambda: len(holder.handled) == 150, timeout=10, what="150")
    await scene.redis.xtrim(scene.stream, maxlen=10)
    await bus.stop(drain_timeout=0.2)

    letters = await scene.bus.dlq.entries(channel=CHANNEL, limit=100)
    assert len(letters) == 50
    assert all("entry trimmed before ack" in letter.reason for letter in letters)
    assert {event_id_of(letter) for letter in letters} == {
        f"e{i:04d}" for i in range(51, 101)
    }
    assert len(holder.handled) + len(letters) == 200
    assert await scene.pending() == 0
    assert holder.empty_data == 0


# -- poison events that kill the process --------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_poison_events_dead_lettered(scene: Scene) -> None:
    """Three process-killing events reach the DLQ; 200 normal ones get through."""
    worker = scene.worker(max_attempts=5, claim_timeout=1, poison_exit=1)
    scene.supervise(worker)
    await scene.wait_started(1)
    published_at = time.time()
    # One batch, so that the first read takes normal events along with the
    # poison ones, and they share the process that the poison kills.
    await scene.publish([Job(id=f"p{i}", poison=True) for i in range(3)] + jobs(200))
    normal = {job.id for job in jobs(200)}
    poison_counts: list[int] = []

    async def finished() -> bool:
        rows = await scene.redis.xpending_range(scene.stream, GROUP, "-", "+", 100)
        poison_counts.extend(int(r["times_delivered"]) for r in rows)
        done = normal <= await scene.handled()
        return done and await scene.dead_letters() == 3 and await scene.pending() == 0

    await wait_for(finished, timeout=60, interval=0.1, what="200 handled, 3 in DLQ")
    first_normal = min(
        at_ms for job_id, _, _, at_ms in await scene.runs() if job_id == "e0000"
    )
    assert first_normal / 1000 - published_at < 10
    assert max(poison_counts, default=0) <= 6
    letters = await scene.bus.dlq.entries(channel=CHANNEL)
    assert sorted(event_id_of(letter) for letter in letters) == [
        "p0",
        "p1",
        "p2",
    ]
    for letter in letters:
        assert "max deliveries exceeded (handler did not return)" in letter.reason
        assert "delivered 6 times" in letter.reason
    assert await scene.pending() == 0


# -- a retry survives a worker crash ------------------------------------------


def retry_worker(scene: Scene, sleep: float = 0) -> Worker:
    return scene.worker(
        max_attempts=4,
        backoff_base=1,
        backoff_cap=5,
        claim_timeout=3,
        fail_first=1,
        sleep=sleep,
    )


async def retry_scheduled(scene: Scene) -> None:
    retry_set = scene.bus.keys.retry(CHANNEL, GROUP)

    async def scheduled() -> bool:
        return int(await scene.redis.zcard(retry_set)) == 1

    await wait_for(scheduled, timeout=10, interval=0.005, what="retry scheduled")


async def retry_settled(scene: Scene, job_id: str) -> None:
    retry_set = scene.bus.keys.retry(CHANNEL, GROUP)

    async def settled() -> bool:
        return (
            job_id in await scene.handled()
            and int(await scene.redis.zcard(retry_set)) == 0
            and await scene.pending() == 0
            and await scene.redo_pending() == 0
        )

    await wait_for(settled, timeout=15, what=f"retry of {job_id} settled")


@pytest.mark.slow
async def test_retry_survives_worker_kill(scene: Scene) -> None:
    worker = retry_worker(scene)
    worker.start()
    await scene.wait_started(1)
    await scene.publish(jobs(1))
    await retry_scheduled(scene)
    worker.kill()
    failed_ms = next(at for _, attempt, _, at in await scene.runs() if attempt == 1)
    await asyncio.sleep(1)  # the restart delay of the scenario
    worker.start()
    await retry_settled(scene, "e0000")

    second = [at for _, attempt, _, at in await scene.runs() if attempt == 2]
    assert len(second) == 1
    assert second[0] - failed_ms <= 4000
    assert int(await scene.redis.zcard(scene.bus.keys.retry(CHANNEL, GROUP))) == 0
    assert await scene.pending() == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_retry_kill_loop_never_loses(scene: Scene) -> None:
    """Kills at random moments after a failure never lose the retry.

    Scaled down from 200 iterations to 20. The kill lands 0-3 s after the
    failure: the backoff is at most 1 s, so the window covers the wait, the
    move back to the redo stream and the second run, which takes 0.1 s. A
    second run happens twice only when the kill hit it, which a 0.1 s run
    in a 3 s window makes rare.
    """
    rng = random.Random(20240601)
    worker = retry_worker(scene, sleep=0.1)
    worker.start()
    doubled = 0
    for round_number in range(20):
        job_id = f"e{round_number:04d}"
        await scene.publish(jobs(1, round_number))
        await retry_scheduled(scene)
        await asyncio.sleep(rng.uniform(0, 3))  # the random kill moment
        killed_ms = int(time.time() * 1000)
        worker.kill()
        worker.start()
        await retry_settled(scene, job_id)

        later = [r for r in await scene.runs() if r[0] == job_id and r[1] >= 2]
        assert later, f"retry of {job_id} was lost"
        if len(later) > 1:
            doubled += 1
            assert later[0][3] <= killed_ms, f"{job_id} ran twice, kill came first"
    assert doubled <= 5
