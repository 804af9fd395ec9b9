"""Publishing: store each event by id and deliver it, coalescing concurrent calls.

Publishes that are waiting while a pipeline is in flight are sent together in
the next pipeline, so a hundred tasks that each publish one event cost about
as many round trips as one task publishing batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from hivebus._tasks import TaskSet
from hivebus.connection import Redis, retry_transient
from hivebus.keys import Keys

logger = logging.getLogger(__name__)

MAX_BATCH = 500
UNOBSERVED_LOG_INTERVAL = 10.0  # seconds between "reached nobody" lines per channel


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What one publish reached: Pub/Sub listeners and stream consumer groups."""

    event_id: str
    channel: str
    listeners: int = 0
    groups: int = 0

    @property
    def delivered(self) -> bool:
        """Whether anyone received the event (a listener or a consumer group)."""
        return self.listeners > 0 or self.groups > 0


@dataclass(slots=True)
class Outgoing:
    """One encoded event waiting for the next pipeline."""

    event_id: str
    channel: str
    body: bytes
    durable: bool
    future: asyncio.Future[PublishResult] = field(repr=False)


@dataclass(slots=True)
class _Unobserved:
    count: int = 0
    logged_count: int = 0
    logged_at: float = 0.0


class Publisher:
    """Send events to Redis, one pipeline per batch of waiting publishes."""

    def __init__(
        self, client: Redis, keys: Keys, *, event_ttl: float, deadline: float
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl_ms = max(1, int(event_ttl * 1000))
        self._deadline = deadline
        self._queue: list[Outgoing] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._unobserved: dict[str, _Unobserved] = defaultdict(_Unobserved)
        self._background = TaskSet()
        self.unobserved_total = 0
        self._uncounted: Counter[str] = Counter()
        self._counting: asyncio.Task[Any] | None = None

    async def send(self, items: list[Outgoing]) -> list[PublishResult]:
        """Queue ``items`` for the next pipeline and wait for their results."""
        self._ensure_writer()
        self._queue.extend(items)
        self._wakeup.set()
        return list(await asyncio.gather(*(item.future for item in items)))

    def _ensure_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(
                self._write_loop(), name="hivebus-writer"
            )

    async def close(self) -> None:
        """Flush what is queued, then stop the writer task."""
        if self._queue:
            await asyncio.gather(
                *(i.future for i in self._queue), return_exceptions=True
            )
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        await self._background.wait()

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
                await self._flush(batch)

    async def _flush(self, batch: list[Outgoing]) -> None:
        try:
            replies = await retry_transient(
                lambda: self._execute(batch),
                deadline=self._deadline,
                what=f"publish of {len(batch)} event(s)",
            )
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self._resolve(batch, replies)

    async def _execute(self, batch: list[Outgoing]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        streams: set[str] = set()
        for item in batch:
            pipe.set(self._keys.event(item.event_id), item.body, px=self._ttl_ms)
            if item.durable:
                stream = self._keys.stream(item.channel)
                pipe.xadd(stream, {"e": item.body})
                streams.add(stream)
            else:
                pipe.publish(self._keys.broadcast(item.channel), item.body)
        for stream in sorted(streams):
            pipe.xinfo_groups(stream)
        return list(await pipe.execute(raise_on_error=False))

    def _resolve(self, batch: list[Outgoing], replies: list[Any]) -> None:
        group_counts = self._group_counts(batch, replies)
        position = 0
        for item in batch:
            store_reply, delivery_reply = replies[position], replies[position + 1]
            position += 2
            if item.future.done():
                continue
            error = next(
                (r for r in (store_reply, delivery_reply) if isinstance(r, Exception)),
                None,
            )
            if error is not None:
                item.future.set_exception(error)
                continue
            if item.durable:
                groups = group_counts.get(self._keys.stream(item.channel), 0)
                result = PublishResult(item.event_id, item.channel, groups=groups)
            else:
                result = PublishResult(
                    item.event_id, item.channel, listeners=int(delivery_reply)
                )
            if not result.delivered:
                self._count_unobserved(result)
            item.future.set_result(result)

    def _group_counts(
        self, batch: list[Outgoing], replies: list[Any]
    ) -> dict[str, int]:
        streams = sorted({self._keys.stream(i.channel) for i in batch if i.durable})
        tail = replies[2 * len(batch) :]
        counts: dict[str, int] = {}
        for stream, reply in zip(streams, tail, strict=True):
            counts[stream] = 0 if isinstance(reply, Exception) else len(reply)
        return counts

    def _count_unobserved(self, result: PublishResult) -> None:
        self.unobserved_total += 1
        entry = self._unobserved[result.channel]
        entry.count += 1
        now = time.monotonic()
        if now - entry.logged_at >= UNOBSERVED_LOG_INTERVAL:
            logger.info(
                "event reached no listener or consumer group channel=%s event_id=%s "
                "unobserved_since_last_log=%d",
                result.channel,
                result.event_id,
                entry.count - entry.logged_count,
            )
            entry.logged_at = now
            entry.logged_count = entry.count
        self._uncounted[result.channel] += 1
        if self._counting is None or self._counting.done():
            self._counting = self._background.spawn(
                self._store_counts(), name="hivebus-count-unobserved"
            )

    async def _store_counts(self) -> None:
        """Add the unobserved counts gathered so far to the shared Redis counters."""
        while self._uncounted:
            counts, self._uncounted = self._uncounted, Counter()
            pipe = self._client.pipeline(transaction=False)
            for channel, count in counts.items():
                pipe.hincrby(self._keys.stats, f"unobserved:{channel}", count)
            await pipe.execute()
