"""Run one durable stream entry through its handler, then settle the entry.

Settling is what happens after a handler run: ack on success, a delayed
retry or a dead letter on failure, and on cancellation a release that lets a
peer claim the entry at once. Each settling step runs to its end even when
the handler's task is cancelled meanwhile, so a shutdown never leaves an
entry both acked and scheduled, or neither.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from hivebus import codec, metrics, tracing
from hivebus.acks import AckBatcher
from hivebus.breaker import CircuitBreaker, Permit
from hivebus.connection import TRANSIENT_ERRORS, Redis
from hivebus.dlq import DeadLetterQueue, Failure
from hivebus.errors import InvalidEventError
from hivebus.events import Event, EventTypes
from hivebus.keys import Keys
from hivebus.scripts import Scripts
from hivebus.subscription import Delivery, Subscription

logger = logging.getLogger(__name__)

T = TypeVar("T")

DeadLetterHook = Callable[
    [Subscription, Event[Any] | None, Failure, str], Awaitable[None]
]

TRIMMED_REASON = "entry trimmed before ack"


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

    @property
    def key(self) -> tuple[str, str]:
        """The (stream, entry id) pair that names this entry in one group."""
        return (self.stream, self.id)


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """The Redis clients, keys, scripts and limits that an entry handler uses."""

    client: Redis
    keys: Keys
    scripts: Scripts
    dlq: DeadLetterQueue
    types: EventTypes
    consumer_name: str
    redo: str
    max_event_bytes: int
    event_ttl_ms: int
    acks: AckBatcher


class EntryHandler:
    """Decode an entry, run the subscription's handler on it, and settle it."""

    def __init__(
        self,
        subscription: Subscription,
        context: HandlerContext,
        stats: ConsumerStats,
        *,
        breaker: CircuitBreaker | None = None,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        self.sub = subscription
        self._ctx = context
        self._client = context.client
        self._stats = stats
        self._breaker = breaker
        self._on_dead_letter = on_dead_letter
        self.trimmed: set[tuple[str, str]] = set()
        """Entries seen trimmed from their stream while their handler ran."""

    # -- handling one entry ----------------------------------------------

    async def handle(self, entry: Entry) -> None:
        """Run the handler on ``entry`` unless it must be skipped or dead-lettered."""
        body = entry.fields.get(b"e")
        history = _attempt_fields(entry)
        if body is None or history is None:
            reason = (
                "entry has no event field 'e'"
                if body is None
                else "entry has invalid attempt fields 'a' or 'ff' (not integers)"
            )
            await self._reject(entry, _describe(entry.fields), Failure(reason, None, 1))
            return
        base_attempt, first_ms = history
        attempt = base_attempt + entry.delivery_count - 1
        try:
            event = codec.decode(
                body, self._ctx.types, self._ctx.max_event_bytes, raw=self.sub.raw
            )
        except InvalidEventError as exc:
            failure = Failure(f"undecodable entry: {exc}", exc, attempt, first_ms)
            await self._reject(entry, body, failure)
            return

        if self.sub.types is not None and event.type not in self.sub.types:
            await _finish(self.ack(entry))
            return
        if attempt > self.sub.retry.max_attempts:
            reason = _undelivered_reason(entry, attempt, self.sub)
            failure = Failure(reason, None, attempt - 1, first_ms)
            await _finish(self.dead_letter(entry, body, event, failure))
            return
        await self._run_guarded(entry, body, event, attempt, first_ms)

    async def _reject(self, entry: Entry, body: bytes | str, failure: Failure) -> None:
        """Dead-letter an entry that cannot be handled at all, and log the reason."""
        logger.warning(
            "entry cannot be handled, dead-lettering it subscription=%s entry_id=%s "
            "reason=%s",
            self.sub.name,
            entry.id,
            failure.reason,
        )
        await _finish(self.dead_letter(entry, body, None, failure))

    async def _run_guarded(
        self, entry: Entry, body: bytes, event: Event[Any], attempt: int, first_ms: int
    ) -> None:
        permit: Permit | None = None
        if self._breaker is not None:
            permit = await self._breaker.acquire()
            if not permit.allowed:
                delay = min(permit.retry_after, self._breaker.config.cooldown)
                await _finish(self.postpone(entry, body, attempt, first_ms, delay))
                return

        try:
            await self._call_handler(entry, event, attempt)
        except asyncio.CancelledError:
            await _finish(self.release(entry, body, event))
            if permit is not None and self._breaker is not None:
                await _finish(self._breaker.release(permit))
            raise
        except Exception as exc:
            if permit is not None:
                await _finish(self._record(permit, success=False))
            await _finish(self._failed(entry, body, event, attempt, first_ms, exc))
            return

        await _finish(self._succeeded(entry, permit))
        self._stats.handled += 1

    async def _succeeded(self, entry: Entry, permit: Permit | None) -> None:
        await self._record(permit, success=True)
        await self.ack(entry)

    async def _record(self, permit: Permit | None, *, success: bool) -> None:
        if permit is not None and self._breaker is not None:
            await self._breaker.record(permit, success=success)

    async def _call_handler(
        self, entry: Entry, event: Event[Any], attempt: int
    ) -> None:
        logger.debug(
            "handler started subscription=%s event_id=%s attempt=%d delivery_count=%d",
            self.sub.name,
            event.id,
            attempt,
            entry.delivery_count,
        )
        if self.sub.wants_delivery:
            delivery = Delivery(
                event=event,
                attempt=attempt,
                delivery_count=entry.delivery_count,
                subscription=self.sub.name,
                entry_id=entry.id,
                _client=self._client,
                _keys=self._ctx.keys,
                _channel=self.sub.channel,
                _group=self.sub.group,
                _ttl_ms=self._ctx.event_ttl_ms,
            )
            call = self.sub.handler(event, delivery)
        else:
            call = self.sub.handler(event)
        async with (
            tracing.handler_span(event, self.sub),
            metrics.handler_timer(
                self._client, self._ctx.keys, self.sub.name, event.type
            ),
            asyncio.timeout(self.sub.handler_timeout),
        ):
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
        self._stats.failed += 1
        first_ms = first_ms or _now_ms()
        decision = self.sub.retry.decide(error, attempt)
        if decision.retry:
            delay = decision.delay
            logger.info(
                "handler failed, retry scheduled subscription=%s event_id=%s "
                "attempt=%d delay=%.2fs error=%r",
                self.sub.name,
                event.id,
                attempt,
                delay,
                error,
            )
            await self.postpone(entry, body, attempt + 1, first_ms, delay)
            self._stats.retried += 1
            metrics.retried(self._client, self._ctx.keys, self.sub.name, event.type)
            return

        if decision.exhausted:
            logger.warning(
                "retries exhausted subscription=%s event_id=%s attempts=%d error=%r",
                self.sub.name,
                event.id,
                attempt,
                error,
            )
        logger.error(
            "handler failed subscription=%s event_id=%s attempt=%d",
            self.sub.name,
            event.id,
            attempt,
            exc_info=error,
        )
        failure = Failure(decision.reason, error, attempt, first_ms)
        await self.dead_letter(entry, body, event, failure)

    # -- settling --------------------------------------------------------

    async def ack(self, entry: Entry) -> None:
        """Acknowledge ``entry``; a redo-stream entry is deleted in the same step."""
        try:
            await self._ctx.acks.ack(entry.stream, entry.id)
        except TRANSIENT_ERRORS as exc:
            logger.error(
                "ack failed, entry will be delivered again subscription=%s "
                "entry_id=%s error=%s",
                self.sub.name,
                entry.id,
                exc,
            )
            return
        logger.debug("entry acked subscription=%s entry_id=%s", self.sub.name, entry.id)

    async def postpone(
        self, entry: Entry, body: bytes, attempt: int, first_ms: int, delay: float
    ) -> None:
        """Move ``entry`` to the retry set, as ``attempt``, due in ``delay`` seconds."""
        member = _retry_member(body, attempt, first_ms, entry)
        delete = "1" if entry.stream == self._ctx.redo else "0"
        await self._ctx.scripts.schedule_retry(
            keys=[self._ctx.keys.retry(self.sub.channel, self.sub.group), entry.stream],
            args=[self.sub.group, entry.id, int(delay * 1000), member, delete],
        )

    async def release(
        self, entry: Entry, body: bytes, event: Event[Any] | None
    ) -> None:
        """Make ``entry`` claimable by a peer at once, without counting a delivery.

        An entry trimmed from its stream while its handler ran has no body left
        in Redis for a peer to claim, so it is dead-lettered with the body held
        here instead of being lost.
        """
        try:
            if entry.key not in self.trimmed and await self._mark_claimable(entry):
                return
            if entry.key in self.trimmed or not await self._entry_exists(entry):
                reason = f"{TRIMMED_REASON} (handler cancelled at shutdown)"
                failure = Failure(reason, None, 0)
                await self.dead_letter(entry, body, event, failure)
        except TRANSIENT_ERRORS as exc:
            logger.warning(
                "could not release entry, a peer claims it after the claim timeout "
                "subscription=%s entry_id=%s error=%s",
                self.sub.name,
                entry.id,
                exc,
            )

    async def _mark_claimable(self, entry: Entry) -> bool:
        idle_ms = int(self.sub.claim_timeout * 1000) + 1
        claimed = await self._client.xclaim(
            entry.stream,
            self.sub.group,
            self._ctx.consumer_name,
            0,
            [entry.id],
            idle=idle_ms,
            justid=True,
        )
        return bool(claimed)

    async def _entry_exists(self, entry: Entry) -> bool:
        rows = await self._client.xrange(entry.stream, min=entry.id, max=entry.id)
        return bool(rows)

    async def dead_letter(
        self,
        entry: Entry,
        body: bytes | str,
        event: Event[Any] | None,
        failure: Failure,
    ) -> None:
        """Move ``entry`` to the dead-letter queue and ack it, in one step."""
        event_json = event.model_dump(mode="json") if event is not None else None
        dead_letter_id = await self._ctx.dlq.add(
            channel=self.sub.channel,
            subscription=self.sub.group,
            body=body,
            failure=failure,
            event=event_json,
            ack=(entry.stream, entry.id),
            origin_id=_origin_id(entry),
        )
        if entry.stream == self._ctx.redo:
            await self._client.xdel(entry.stream, entry.id)
        self._stats.dead_lettered += 1
        metrics.dead_lettered(self._client, self._ctx.keys, self.sub.name, event)
        if self._on_dead_letter is not None:
            await self._on_dead_letter(self.sub, event, failure, dead_letter_id)

    async def report_trimmed(self, stream: str, ids: list[str]) -> None:
        """Dead-letter pending entries whose body was trimmed before their ack."""
        for entry_id in ids:
            logger.warning(
                "pending entry was trimmed before ack subscription=%s stream=%s "
                "entry_id=%s",
                self.sub.name,
                stream,
                entry_id,
            )
            failure = Failure(reason=f"{TRIMMED_REASON} (body no longer available)")
            await self.dead_letter(Entry(stream, entry_id, {}), b"", None, failure)


async def _finish(step: Awaitable[T]) -> T:
    """Run ``step`` to its end even if the calling task is cancelled meanwhile."""
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _attempt_fields(entry: Entry) -> tuple[int, int] | None:
    """Return the entry's attempt number and first failure time, or None if invalid."""
    try:
        attempt = int(entry.fields.get(b"a", b"1"))
        first_ms = int(entry.fields.get(b"ff", b"0"))
    except ValueError:
        return None
    if attempt < 1 or first_ms < 0:
        return None
    return attempt, first_ms


def _undelivered_reason(entry: Entry, attempt: int, sub: Subscription) -> str:
    return (
        f"max deliveries exceeded (handler did not return): delivered "
        f"{entry.delivery_count} times, attempt {attempt} of "
        f"{sub.retry.max_attempts}"
    )


def _retry_member(body: bytes, attempt: int, first_ms: int, entry: Entry) -> str:
    return json.dumps(
        {
            "e": body.decode(errors="replace"),
            "a": str(attempt),
            "ff": str(first_ms),
            "src": _origin_id(entry),
        }
    )


def _origin_id(entry: Entry) -> str:
    """Return the event's entry id in the channel stream, carried through retries.

    Redo entries carry it in ``src``; an entry without ``src`` is the
    channel stream's own.
    """
    origin = entry.fields.get(b"src")
    return entry.id if origin is None else _text(origin)


def _describe(fields: dict[bytes, bytes]) -> str:
    return repr({_text(k): _text(v)[:200] for k, v in fields.items()})[:2000]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
