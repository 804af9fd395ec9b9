"""Durable delivery: one consumer-group reader per subscription and process.

The consume loop reads new entries and due retries, runs handlers under a
concurrency limit, and acks an entry only after its handler returns (see
``hivebus.handling``). A lease keeper task refreshes the idle time of every
entry in flight, so a live consumer keeps its entries however long their
handlers run. Between reads the loop moves due retries back, trims the
streams by age, and takes over entries that a dead consumer left pending.

An entry taken over from a dead consumer is a suspect: it may be the one
that killed that consumer. A suspect runs alone. The loop stops reading,
lets the handlers in flight finish, claims one suspect and runs it with
nothing beside it, so a process-killing event takes no healthy entry down
with it and cannot burn the delivery count of its neighbours. Suspects go
lowest delivery count first, so fresh victims of a crash run before the
entry that keeps crashing. The cost is throughput while suspects wait, and
only right after a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis import exceptions as redis_errors

from hivebus.acks import AckBatcher
from hivebus.breaker import CircuitBreaker
from hivebus.connection import TRANSIENT_ERRORS, Backoff, Redis, is_nogroup
from hivebus.dlq import DeadLetterQueue
from hivebus.events import EventTypes
from hivebus.handling import (
    ConsumerStats,
    DeadLetterHook,
    Entry,
    EntryHandler,
    HandlerContext,
)
from hivebus.keys import Keys
from hivebus.pending import PendingEntries
from hivebus.scripts import Scripts
from hivebus.subscription import Subscription

logger = logging.getLogger(__name__)

BLOCK_MS = 500  # maximum wait for new entries, so also how late a due retry starts
RETRY_POLL = 0.1  # seconds between looks for due retries and replays
READ_DEFER = 0.005  # seconds a read waits for more free slots when few are free
TRIM_INTERVAL = 30.0  # seconds between age trims of the stream
HALF_OPEN_POLL = 0.2  # seconds between breaker checks while another probe runs
# An unexpected error in the consume loop (a bug, or a reply hivebus does not
# expect) is logged with its traceback, and the loop goes on after this pause.
# A recurring error then costs one log line a second instead of a hot loop.
ERROR_PAUSE = 1.0

__all__ = ["ConsumerStats", "DurableConsumer", "Entry"]


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
        trim_interval: float = TRIM_INTERVAL,
    ) -> None:
        self.sub = subscription
        self._client = client
        self._reader = reader
        self._keys = keys
        self._scripts = scripts
        self._breaker = breaker
        self.consumer_name = consumer_name
        self._retention_ms = int(stream_retention * 1000)
        self.trim_interval = trim_interval
        self.stream = keys.stream(subscription.channel)
        self.redo = keys.redo(subscription.channel, subscription.group)
        self.retry_set = keys.retry(subscription.channel, subscription.group)

        self.stats = ConsumerStats()
        context = HandlerContext(
            client=client,
            keys=keys,
            scripts=scripts,
            dlq=dlq,
            types=types,
            consumer_name=consumer_name,
            redo=self.redo,
            max_event_bytes=max_event_bytes,
            event_ttl_ms=int(event_ttl * 1000),
            acks=AckBatcher(client, subscription.group, redo=self.redo),
        )
        self._handler = EntryHandler(
            subscription,
            context,
            self.stats,
            breaker=breaker,
            on_dead_letter=on_dead_letter,
        )
        self._pending = PendingEntries(
            subscription,
            client=client,
            consumer_name=consumer_name,
            streams=(self.stream, self.redo),
            handler=self._handler,
            stats=self.stats,
        )

        # Reads block for at most a quarter of the claim timeout, so that the
        # loop looks for stale entries four times per claim timeout.
        self._block_ms = max(10, min(BLOCK_MS, int(subscription.claim_timeout * 250)))
        self._in_flight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._alone: tuple[str, str] | None = None  # the suspect running alone
        self._suspects: list[tuple[str, str]] = []
        self._next_claim = 0.0
        self._next_trim = 0.0
        self._next_move = 0.0
        self._redo_waiting = True  # whether the redo stream may hold unread entries
        self._min_read = max(1, min(subscription.batch, subscription.concurrency) // 4)
        self._drain_timeout: float | None = None
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self.health = "starting"

    # -- lifecycle -------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Handler runs in progress now."""
        return len(self._in_flight)

    async def wait_ready(self) -> None:
        """Wait until the consumer group exists and the first upkeep pass is done.

        The consumer may still be busy with entries of a dead consumer then,
        because it takes those over before it reads new ones.
        """
        await self._ready.wait()

    def stop(self, *, drain_timeout: float | None = None) -> None:
        """Stop reading; in-flight handlers get ``drain_timeout`` seconds to finish.

        Without ``drain_timeout`` the one given to ``run`` applies.
        """
        self._drain_timeout = drain_timeout
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
        leases = asyncio.create_task(
            self._pending.keep_leases(self._in_flight),
            name=f"hivebus-leases-{self.sub.name}",
        )
        try:
            await self._loop()
        finally:
            try:
                timeout = self._drain_timeout
                await self._drain(drain_timeout if timeout is None else timeout)
            finally:
                leases.cancel()
                await asyncio.gather(leases, return_exceptions=True)
                self.health = "stopped"
                self._log_stopped()

    def _log_stopped(self) -> None:
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
                    await self._unexpected(exc)
                    continue
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
            except Exception as exc:
                await self._unexpected(exc)
                continue
            if self.health != "healthy":
                self._recovered(backoff)

    async def _unexpected(self, error: Exception) -> None:
        logger.error(
            "consume loop failed, going on after %.1fs subscription=%s",
            ERROR_PAUSE,
            self.sub.name,
            exc_info=error,
        )
        self._ready.set()
        await self._sleep(ERROR_PAUSE)

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
        await self._sleep(delay)

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

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # -- one iteration ---------------------------------------------------

    async def _iterate(self) -> None:
        await self._upkeep()
        self._ready.set()
        if self._alone is not None or self.in_flight >= self.sub.concurrency:
            await self._wait_in_flight()
            return
        if self._suspects:
            await self._next_suspect()
            return

        limit = self.sub.concurrency - self.in_flight
        if self.in_flight and limit < self._min_read:
            # Give busy handlers a moment to free more slots: reading one or
            # two entries per round trip costs more than this short wait.
            await asyncio.wait(
                list(self._in_flight.values()),
                timeout=READ_DEFER,
                return_when=asyncio.FIRST_COMPLETED,
            )
            limit = self.sub.concurrency - self.in_flight
        if self._breaker is not None:
            wait, allowed = await self._breaker_gate()
            if allowed == 0:
                await self._sleep(min(wait, 1.0))
                return
            limit = min(limit, allowed)
        for entry in await self._read(min(limit, self.sub.batch)):
            self._start(entry)

    async def _wait_in_flight(self) -> None:
        tasks = list(self._in_flight.values())
        if tasks:
            await asyncio.wait(
                tasks,
                timeout=self._block_ms / 1000,
                return_when=asyncio.FIRST_COMPLETED,
            )

    async def _read(self, count: int) -> list[Entry]:
        """Read up to ``count`` entries: due retries first, then new events.

        The two streams are read one after the other because XREADGROUP's
        COUNT applies to each stream, and one read of both could return
        twice the concurrency limit.
        """
        entries: list[Entry] = []
        if self._redo_waiting:
            entries = await self._read_stream(self.redo, count, block=None)
            self._redo_waiting = len(entries) == count
        if len(entries) < count:
            block = None if entries else self._block_ms
            entries += await self._read_stream(
                self.stream, count - len(entries), block=block
            )
        if entries:
            logger.debug(
                "entries read subscription=%s count=%d", self.sub.name, len(entries)
            )
        return entries

    async def _read_stream(
        self, stream: str, count: int, *, block: int | None
    ) -> list[Entry]:
        reply: Any = await self._reader.xreadgroup(
            self.sub.group, self.consumer_name, {stream: ">"}, count=count, block=block
        )
        return [
            Entry(_text(name), _text(entry_id), fields or {})
            for name, rows in reply or []
            for entry_id, fields in rows
        ]

    def _start(self, entry: Entry, *, alone: bool = False) -> None:
        key = entry.key
        if key in self._in_flight:
            return
        task = asyncio.create_task(
            self._handler.handle(entry), name=f"hivebus-handle-{entry.id}"
        )
        self._in_flight[key] = task
        if alone:
            self._alone = key
        task.add_done_callback(lambda _: self._finished(key))

    def _finished(self, key: tuple[str, str]) -> None:
        self._in_flight.pop(key, None)
        self._handler.trimmed.discard(key)
        if self._alone == key:
            self._alone = None

    async def _next_suspect(self) -> None:
        """Wait for the handlers in flight, then claim one suspect and run it alone."""
        if self._in_flight:
            await self._wait_in_flight()
            return
        stream, entry_id = self._suspects.pop(0)
        entry = await self._pending.claim(stream, entry_id)
        if entry is not None:
            self._start(entry, alone=True)

    # -- upkeep ----------------------------------------------------------

    async def _upkeep(self) -> None:
        now = time.monotonic()
        if now >= self._next_move:
            await self._move_due_retries(now)
        if now >= self._next_claim:
            self._next_claim = now + max(0.1, self.sub.claim_timeout / 4)
            if self._alone is None and not self._suspects:
                self._suspects = await self._pending.find_stale(self._in_flight)
        if now >= self._next_trim:
            self._next_trim = now + self.trim_interval
            await self.trim()

    async def _move_due_retries(self, now: float) -> None:
        """Move due retries to the redo stream, and plan the next look.

        The next look comes when the next known retry is due, and at least
        every ``RETRY_POLL`` seconds, because other processes schedule
        retries and replays too.
        """
        moved, wait_ms = await self._scripts.move_due(
            keys=[self.retry_set, self.redo], args=[self.sub.batch]
        )
        wait = RETRY_POLL if int(wait_ms) < 0 else min(RETRY_POLL, int(wait_ms) / 1000)
        self._next_move = now + wait
        self._redo_waiting = True
        if moved:
            logger.debug(
                "due retries moved subscription=%s count=%d", self.sub.name, moved
            )

    async def trim(self) -> int:
        """Trim both streams by age, never past an entry that is still pending.

        The redo stream holds only this group's retries and replays, which
        are deleted once settled, so its unread entries are never trimmed.
        """
        removed = 0
        for stream, keep_unread in ((self.stream, "0"), (self.redo, "1")):
            reply = await self._scripts.trim(
                keys=[stream], args=[self._retention_ms, keep_unread]
            )
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

        Closed: read freely. Open, or half-open while another instance's probe
        runs: read nothing until a call could pass. Once the cool-down is over:
        one entry, whose handler run may become the single probe.
        """
        assert self._breaker is not None
        permit = await self._breaker.peek()
        if not permit.allowed:
            return max(permit.retry_after, HALF_OPEN_POLL), 0
        if permit.state == "closed":
            return 0.0, self.sub.concurrency
        if self.in_flight:
            # An entry read for the probe may not have taken the lease yet;
            # another one read now would only be rejected and postponed.
            return HALF_OPEN_POLL, 0
        return 0.0, 1


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
