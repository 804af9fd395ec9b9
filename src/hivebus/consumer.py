"""Durable delivery: one consumer-group reader per subscription and process.

The consume loop reads new entries and due retries, runs handlers under a
concurrency limit, and acks an entry only after its handler returns. Between
reads it does the upkeep that keeps delivery at least once: it refreshes the
lease on entries it is still handling, claims entries that a dead consumer
left pending, moves due retries back, and trims the stream by age.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors

from hivebus import codec
from hivebus.breaker import CircuitBreaker, Permit
from hivebus.connection import TRANSIENT_ERRORS, Backoff, Redis, is_nogroup
from hivebus.dlq import DeadLetterQueue, Failure
from hivebus.errors import InvalidEventError, RetryLater
from hivebus.events import Event, EventTypes
from hivebus.keys import Keys
from hivebus.scripts import Scripts
from hivebus.subscription import Delivery, Subscription

logger = logging.getLogger(__name__)

BLOCK_MS = 500  # longest wait for new entries; also bounds how late a due retry starts
TRIM_INTERVAL = 30.0  # seconds between age trims of the stream
HALF_OPEN_POLL = 0.2  # seconds between breaker checks while another probe runs

DeadLetterHook = Callable[
    [Subscription, Event[Any] | None, Failure, str], Awaitable[None]
]


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one consumer since it started."""

    handled: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    reconnects: int = 0


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as read, with how often Redis has delivered it."""

    stream: str
    id: str
    fields: dict[bytes, bytes]
    delivery_count: int = 1


@dataclass(slots=True)
class _Timers:
    heartbeat: float = 0.0
    claim: float = 0.0
    trim: float = 0.0
    claim_cursor: dict[str, str] = field(default_factory=dict)


class DurableConsumer:
    """Read one durable subscription's entries and run its handler on them."""

    def __init__(
        self,
        subscription: Subscription,
        *,
        client: Redis,
        reader: Redis,
        keys: Keys,
        scripts: Scripts,
        dlq: DeadLetterQueue,
        types: EventTypes,
        consumer_name: str,
        max_event_bytes: int,
        event_ttl: float,
        stream_retention: float,
        breaker: CircuitBreaker | None = None,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        self.sub = subscription
        self._client = client
        self._reader = reader
        self._keys = keys
        self._scripts = scripts
        self._dlq = dlq
        self._types = types
        self.consumer_name = consumer_name
        self._max_bytes = max_event_bytes
        self._ttl_ms = int(event_ttl * 1000)
        self._retention_ms = int(stream_retention * 1000)
        self._breaker = breaker
        self._on_dead_letter = on_dead_letter
        self.stream = keys.stream(subscription.channel)
        self.redo = keys.redo(subscription.channel, subscription.group)
        self.retry_set = keys.retry(subscription.channel, subscription.group)
        self._in_flight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._timers = _Timers()
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self.stats = ConsumerStats()
        self.health = "starting"

    # -- lifecycle -------------------------------------------------------

    async def wait_ready(self) -> None:
        """Wait until the consumer group exists and the first read is issued."""
        await self._ready.wait()

    def stop(self) -> None:
        """Ask the loop to stop reading; in-flight handlers are left to finish."""
        self._stopping.set()

    async def run(self, *, drain_timeout: float = 30.0) -> None:
        """Consume until ``stop`` is called, then finish or release in-flight work."""
        logger.info(
            "durable consumer started subscription=%s consumer=%s concurrency=%d "
            "claim_timeout=%.1fs max_attempts=%d",
            self.sub.name,
            self.consumer_name,
            self.sub.concurrency,
            self.sub.claim_timeout,
            self.sub.retry.max_attempts,
        )
        try:
            await self._loop()
        finally:
            await self._drain(drain_timeout)
            self.health = "stopped"
            logger.info(
                "durable consumer stopped subscription=%s handled=%d failed=%d "
                "retried=%d dead_lettered=%d claimed=%d",
                self.sub.name,
                self.stats.handled,
                self.stats.failed,
                self.stats.retried,
                self.stats.dead_lettered,
                self.stats.claimed,
            )

    async def _loop(self) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        group_ready = False
        while not self._stopping.is_set():
            try:
                if not group_ready:
                    await self.ensure_group()
                    group_ready = True
                await self._iterate()
            except redis_errors.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                logger.warning(
                    "consumer group missing, recreating it subscription=%s "
                    "stream=%s reason=%s",
                    self.sub.name,
                    self.stream,
                    exc,
                )
                group_ready = False
            except TRANSIENT_ERRORS as exc:
                await self._degraded(exc, backoff)
                continue
            if self.health != "healthy":
                self._recovered(backoff)

    async def _degraded(self, error: BaseException, backoff: Backoff) -> None:
        delay = backoff.next_delay()
        self.health = "degraded"
        self._ready.set()
        logger.error(
            "redis unreachable, consumer waiting subscription=%s attempt=%d "
            "delay=%.2fs error=%s",
            self.sub.name,
            backoff.attempt,
            delay,
            error,
        )
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        except TimeoutError:
            pass

    def _recovered(self, backoff: Backoff) -> None:
        if self.health == "degraded":
            self.stats.reconnects += 1
            logger.info("consumer reconnected subscription=%s", self.sub.name)
        self.health = "healthy"
        backoff.reset()

    async def ensure_group(self) -> None:
        """Create the streams and consumer group if they do not exist."""
        start = "0" if self.sub.from_start else "$"
        for stream, first in ((self.stream, start), (self.redo, "0")):
            try:
                await self._client.xgroup_create(
                    stream, self.sub.group, first, mkstream=True
                )
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        await self._client.sadd(self._keys.channels, self.sub.channel)

    async def _drain(self, timeout: float) -> None:
        tasks = list(self._in_flight.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            logger.warning(
                "in-flight handlers cancelled at shutdown, entries released "
                "subscription=%s count=%d",
                self.sub.name,
                len(pending),
            )

    # -- one iteration ---------------------------------------------------

    async def _iterate(self) -> None:
        await self._upkeep()
        free = self.sub.concurrency - len(self._in_flight)
        if free <= 0:
            await asyncio.wait(
                list(self._in_flight.values()),
                timeout=BLOCK_MS / 1000,
                return_when=asyncio.FIRST_COMPLETED,
            )
            return
        if self._breaker is not None:
            wait, limit = await self._breaker_gate()
            if limit == 0:
                self._ready.set()
                await self._sleep(min(wait, 1.0))
                return
            free = min(free, limit)
        for entry in await self._read(min(free, self.sub.batch)):
            self._start(entry)

    async def _read(self, count: int) -> list[Entry]:
        self._ready.set()
        reply: Any = await self._reader.xreadgroup(
            self.sub.group,
            self.consumer_name,
            {self.stream: ">", self.redo: ">"},
            count=count,
            block=BLOCK_MS,
        )
        entries = []
        for stream_name, rows in reply or []:
            stream = _text(stream_name)
            for entry_id, fields in rows:
                entries.append(Entry(stream, _text(entry_id), fields or {}))
        if entries:
            logger.debug(
                "entries read subscription=%s count=%d", self.sub.name, len(entries)
            )
        return entries

    def _start(self, entry: Entry) -> None:
        key = (entry.stream, entry.id)
        if key in self._in_flight:
            return
        task = asyncio.create_task(
            self._handle(entry), name=f"hivebus-handle-{entry.id}"
        )
        self._in_flight[key] = task
        task.add_done_callback(lambda _: self._in_flight.pop(key, None))

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # -- upkeep ----------------------------------------------------------

    async def _upkeep(self) -> None:
        now = time.monotonic()
        await self._move_due_retries()
        if now >= self._timers.heartbeat:
            self._timers.heartbeat = now + self.sub.claim_timeout / 3
            await self._heartbeat()
        if now >= self._timers.claim:
            self._timers.claim = now + max(0.1, self.sub.claim_timeout / 4)
            await self._claim_stale()
        if now >= self._timers.trim:
            self._timers.trim = now + TRIM_INTERVAL
            await self.trim()

    async def _move_due_retries(self) -> None:
        moved, _ = await self._scripts.move_due(
            keys=[self.retry_set, self.redo], args=[self.sub.batch]
        )
        if moved:
            logger.debug(
                "due retries moved subscription=%s count=%d", self.sub.name, moved
            )

    async def _heartbeat(self) -> None:
        """Reset the idle time of entries being handled, so no peer claims them."""
        by_stream: dict[str, list[Any]] = {}
        for stream, entry_id in list(self._in_flight):
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            await self._client.xclaim(
                stream, self.sub.group, self.consumer_name, 0, ids, justid=True
            )

    async def _claim_stale(self) -> None:
        free = self.sub.concurrency - len(self._in_flight)
        if free <= 0:
            return
        idle_ms = int(self.sub.claim_timeout * 1000)
        for stream in (self.stream, self.redo):
            cursor = self._timers.claim_cursor.get(stream, "0-0")
            reply: Any = await self._client.xautoclaim(
                stream, self.sub.group, self.consumer_name, idle_ms, cursor, count=free
            )
            self._timers.claim_cursor[stream] = _text(reply[0])
            claimed = [(_text(i), f) for i, f in reply[1] if f is not None]
            deleted = [_text(i) for i in (reply[2] if len(reply) > 2 else [])]
            if deleted:
                await self._report_trimmed(stream, deleted)
            if claimed:
                await self._start_claimed(stream, claimed)

    async def _start_claimed(
        self, stream: str, claimed: list[tuple[str, dict[bytes, bytes]]]
    ) -> None:
        counts = await self._delivery_counts(stream, [i for i, _ in claimed])
        self.stats.claimed += len(claimed)
        logger.warning(
            "claimed entries left pending by a stalled or dead consumer "
            "subscription=%s stream=%s count=%d first_id=%s",
            self.sub.name,
            stream,
            len(claimed),
            claimed[0][0],
        )
        for entry_id, fields in claimed:
            self._start(Entry(stream, entry_id, fields, counts.get(entry_id, 2)))

    async def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        rows = await self._client.xpending_range(
            stream, self.sub.group, min=ids[0], max=ids[-1], count=len(ids) + 100
        )
        return {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    async def _report_trimmed(self, stream: str, ids: list[str]) -> None:
        for entry_id in ids:
            logger.warning(
                "pending entry was trimmed before ack subscription=%s stream=%s "
                "entry_id=%s",
                self.sub.name,
                stream,
                entry_id,
            )
            failure = Failure(
                reason="entry trimmed before ack (body no longer available)"
            )
            await self._dead_letter(Entry(stream, entry_id, {}), b"", None, failure)

    async def trim(self) -> int:
        """Trim both streams by age, never past an entry that is still pending."""
        removed = 0
        for stream in (self.stream, self.redo):
            reply = await self._scripts.trim(keys=[stream], args=[self._retention_ms])
            removed += int(reply[0])
            for group in reply[1:]:
                logger.warning(
                    "trimmed entries that a group had not read, retention passed "
                    "stream=%s group=%s",
                    stream,
                    _text(group),
                )
        if removed:
            logger.debug(
                "stream trimmed subscription=%s removed=%d", self.sub.name, removed
            )
        return removed

    # -- breaker ---------------------------------------------------------

    async def _breaker_gate(self) -> tuple[float, int]:
        """Return (seconds to wait, entries that may be read) under the breaker.

        Closed: read freely. Open: read nothing until the cool-down ends, then
        one entry, whose handler run may become the single probe. Half-open:
        read nothing while another instance's probe runs.
        """
        assert self._breaker is not None
        state = await self._breaker.state()
        if state["state"] == "closed":
            return 0.0, self.sub.concurrency
        if state["state"] == "half_open":
            return HALF_OPEN_POLL, 0
        seconds, micros = await self._client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        reopen_ms = state["opened_at_ms"] + int(self._breaker.config.cooldown * 1000)
        if now_ms < reopen_ms:
            return (reopen_ms - now_ms) / 1000, 0
        return 0.0, 1

    # -- handling one entry ----------------------------------------------

    async def _handle(self, entry: Entry) -> None:
        body = entry.fields.get(b"e")
        if body is None:
            failure = Failure(reason="entry has no event field 'e'", attempts=1)
            await self._dead_letter(entry, _describe(entry.fields), None, failure)
            return
        base_attempt = int(entry.fields.get(b"a", b"1"))
        first_ms = int(entry.fields.get(b"ff", b"0"))
        attempt = base_attempt + entry.delivery_count - 1
        try:
            event = codec.decode(body, self._types, self._max_bytes, raw=self.sub.raw)
        except InvalidEventError as exc:
            failure = Failure(f"undecodable entry: {exc}", exc, attempt, first_ms)
            await self._dead_letter(entry, body, None, failure)
            return
        if self.sub.types is not None and event.type not in self.sub.types:
            await self._ack(entry)
            return
        if attempt > self.sub.retry.max_attempts:
            reason = (
                f"max deliveries exceeded (handler did not return): delivered "
                f"{entry.delivery_count} times, attempt {attempt} of "
                f"{self.sub.retry.max_attempts}"
            )
            await self._dead_letter(
                entry, body, event, Failure(reason, None, attempt - 1, first_ms)
            )
            return
        await self._run_guarded(entry, body, event, attempt, first_ms)

    async def _run_guarded(
        self, entry: Entry, body: bytes, event: Event[Any], attempt: int, first_ms: int
    ) -> None:
        permit: Permit | None = None
        if self._breaker is not None:
            permit = await self._breaker.acquire()
            if not permit.allowed:
                delay = min(permit.retry_after, self._breaker.config.cooldown)
                await self._postpone(
                    entry, body, base_attempt=attempt, first_ms=first_ms, delay=delay
                )
                return
        try:
            await self._call_handler(entry, event, attempt)
        except asyncio.CancelledError:
            await asyncio.shield(self._release(entry))
            raise
        except Exception as exc:
            if permit is not None:
                await asyncio.shield(self._breaker.record(permit, success=False))  # type: ignore[union-attr]
            await asyncio.shield(
                self._failed(entry, body, event, attempt, first_ms, exc)
            )
            return
        if permit is not None:
            await asyncio.shield(self._breaker.record(permit, success=True))  # type: ignore[union-attr]
        await asyncio.shield(self._ack(entry))
        self.stats.handled += 1

    async def _call_handler(
        self, entry: Entry, event: Event[Any], attempt: int
    ) -> None:
        logger.debug(
            "handler started subscription=%s event_id=%s attempt=%d",
            self.sub.name,
            event.id,
            attempt,
        )
        if self.sub.wants_delivery:
            delivery = Delivery(
                event=event,
                attempt=attempt,
                delivery_count=entry.delivery_count,
                subscription=self.sub.name,
                entry_id=entry.id,
                _client=self._client,
                _keys=self._keys,
                _channel=self.sub.channel,
                _group=self.sub.group,
                _ttl_ms=self._ttl_ms,
            )
            call = self.sub.handler(event, delivery)
        else:
            call = self.sub.handler(event)
        async with asyncio.timeout(self.sub.handler_timeout):
            await call

    async def _failed(
        self,
        entry: Entry,
        body: bytes,
        event: Event[Any],
        attempt: int,
        first_ms: int,
        error: Exception,
    ) -> None:
        self.stats.failed += 1
        first_ms = first_ms or _now_ms()
        retry = isinstance(error, RetryLater) and attempt < self.sub.retry.max_attempts
        if retry or self.sub.retry.should_retry(error, attempt):
            delay = (
                error.delay if isinstance(error, RetryLater) and error.delay else None
            )
            delay = self.sub.retry.delay(attempt) if delay is None else delay
            logger.info(
                "handler failed, retry scheduled subscription=%s event_id=%s "
                "attempt=%d delay=%.2fs error=%r",
                self.sub.name,
                event.id,
                attempt,
                delay,
                error,
            )
            await self._postpone(
                entry, body, base_attempt=attempt + 1, first_ms=first_ms, delay=delay
            )
            self.stats.retried += 1
            return
        if attempt >= self.sub.retry.max_attempts:
            reason = f"retries exhausted after {attempt} attempt(s)"
            logger.warning(
                "retries exhausted subscription=%s event_id=%s attempts=%d error=%r",
                self.sub.name,
                event.id,
                attempt,
                error,
            )
        else:
            reason = f"not retried: {type(error).__name__}"
        logger.error(
            "handler failed subscription=%s event_id=%s attempt=%d",
            self.sub.name,
            event.id,
            attempt,
            exc_info=error,
        )
        await self._dead_letter(
            entry, body, event, Failure(reason, error, attempt, first_ms)
        )

    # -- bookkeeping after a handler run ---------------------------------

    async def _ack(self, entry: Entry) -> None:
        try:
            await self._client.xack(entry.stream, self.sub.group, entry.id)
        except TRANSIENT_ERRORS as exc:
            logger.error(
                "ack failed, entry will be delivered again subscription=%s entry_id=%s "
                "error=%s",
                self.sub.name,
                entry.id,
                exc,
            )
            return
        if entry.stream == self.redo:
            await self._client.xdel(self.redo, entry.id)
        logger.debug("entry acked subscription=%s entry_id=%s", self.sub.name, entry.id)

    async def _postpone(
        self,
        entry: Entry,
        body: bytes,
        *,
        base_attempt: int,
        first_ms: int,
        delay: float,
    ) -> None:
        """Move an entry to the retry set, to run again after ``delay`` seconds."""
        member = _retry_member(body, base_attempt, first_ms, entry)
        await self._scripts.schedule_retry(
            keys=[self.retry_set, entry.stream],
            args=[self.sub.group, entry.id, int(delay * 1000), member],
        )
        if entry.stream == self.redo:
            await self._client.xdel(self.redo, entry.id)

    async def _release(self, entry: Entry) -> None:
        """Make an entry claimable by a peer at once, without counting a delivery."""
        try:
            idle_ms = int(self.sub.claim_timeout * 1000) + 1
            await self._client.xclaim(
                entry.stream,
                self.sub.group,
                self.consumer_name,
                0,
                [entry.id],
                idle=idle_ms,
                justid=True,
            )
        except TRANSIENT_ERRORS:
            logger.warning(
                "could not release entry subscription=%s entry_id=%s",
                self.sub.name,
                entry.id,
            )

    async def _dead_letter(
        self,
        entry: Entry,
        body: bytes | str,
        event: Event[Any] | None,
        failure: Failure,
    ) -> None:
        event_json = event.model_dump(mode="json") if event is not None else None
        dead_letter_id = await self._dlq.add(
            channel=self.sub.channel,
            subscription=self.sub.group,
            body=body,
            failure=failure,
            event=event_json,
            ack=(entry.stream, entry.id),
        )
        if entry.stream == self.redo:
            await self._client.xdel(self.redo, entry.id)
        self.stats.dead_lettered += 1
        if self._on_dead_letter is not None:
            await self._on_dead_letter(self.sub, event, failure, dead_letter_id)


def _retry_member(body: bytes, attempt: int, first_ms: int, entry: Entry) -> str:
    import json

    return json.dumps(
        {
            "e": body.decode(errors="replace"),
            "a": str(attempt),
            "ff": str(first_ms),
            "src": f"{entry.stream}|{entry.id}",
        }
    )


def _describe(fields: dict[bytes, bytes]) -> str:
    return repr({_text(k): _text(v)[:200] for k, v in fields.items()})[:2000]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
