"""A worker process for fault-injection tests: a Bus with one durable subscription.

Run as ``python durable_worker.py``; every setting comes from an ``HB_*``
environment variable (see ``Options`` in ``tests/workers/control.py``). The
handler records what it does in Redis keys under ``PREFIX:t:``, so that the
test can read them after this process is killed:

    PREFIX:t:started    string  INCR once the bus has started
    PREFIX:t:starts     hash    event id -> handler runs begun
    PREFIX:t:runs       list    "id|attempt|delivery_count|unix ms" per run
    PREFIX:t:handled    set     ids whose handler reached its end
    PREFIX:t:effects    hash    id -> side effects applied through Delivery.once

Test hooks are off by default. ``HB_POISON_EXIT`` ends the process with
``os._exit(137)`` when an event has ``poison`` set. ``HB_FAIL_FIRST`` makes
attempt 1 of every event raise. ``HB_EXIT_AFTER_EFFECT`` ends the process
right after the side effect and before the ack, on an entry's first
delivery only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from pydantic import BaseModel

from hivebus import Bus, Delivery, Event, RetryPolicy

JOB_TYPE = "test.job"


class Job(BaseModel):
    """The payload of every test event."""

    id: str
    poison: bool = False


def setting(name: str, default: str = "") -> str:
    """Return the ``HB_<name>`` environment variable, or ``default``."""
    return os.environ.get(f"HB_{name}", default)


def flag(name: str) -> bool:
    """Tell whether the ``HB_<name>`` hook is on."""
    return setting(name) == "1"


def make_bus() -> Bus:
    """Build the bus and its one durable subscription from the environment."""
    prefix = setting("PREFIX")
    bus = Bus(
        setting("URL"),
        prefix=prefix,
        service="worker",
        consumer_name=setting("CONSUMER") or None,
    )
    bus.types.register(JOB_TYPE, Job)
    key = f"{prefix}:t"
    sleep = float(setting("SLEEP", "0"))
    retry = RetryPolicy(
        max_attempts=int(setting("MAX_ATTEMPTS", "5")),
        base=float(setting("BACKOFF_BASE", "0.5")),
        cap=float(setting("BACKOFF_CAP", "60")),
    )

    @bus.subscribe(
        setting("CHANNEL", "work"),
        durable=True,
        group=setting("GROUP", "workers"),
        concurrency=int(setting("CONCURRENCY", "16")),
        batch=int(setting("BATCH", "100")),
        claim_timeout=float(setting("CLAIM_TIMEOUT", "30")),
        retry=retry,
    )
    async def handle(event: Event[Job], delivery: Delivery) -> None:
        job = event.data
        run = f"{job.id}|{delivery.attempt}|{delivery.delivery_count}|{now_ms()}"
        async with bus.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(f"{key}:starts", job.id, 1)
            pipe.rpush(f"{key}:runs", run)
            await pipe.execute()
        if job.poison and flag("POISON_EXIT"):
            os._exit(137)
        if flag("FAIL_FIRST") and delivery.attempt == 1:
            raise RuntimeError(f"attempt 1 of {job.id} fails on purpose")
        if sleep:
            await asyncio.sleep(sleep)
        if flag("EFFECT"):
            await delivery.once(
                "effect", lambda pipe: pipe.hincrby(f"{key}:effects", job.id, 1)
            )
            if flag("EXIT_AFTER_EFFECT") and delivery.delivery_count == 1:
                os._exit(137)
        await bus.client.sadd(f"{key}:handled", job.id)

    return bus


def now_ms() -> int:
    """Return the wall clock in Unix ms (the test runs on the same host)."""
    return int(time.time() * 1000)


async def main() -> None:
    """Serve until SIGTERM, then stop with a short drain."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(message)s"
    )
    bus = make_bus()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await bus.start()
    await bus.client.incr(f"{setting('PREFIX')}:t:started")
    await stopping.wait()
    await bus.stop(drain_timeout=float(setting("DRAIN", "5")))


if __name__ == "__main__":
    asyncio.run(main())
