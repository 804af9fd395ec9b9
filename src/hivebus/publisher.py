"""Publishing: store each event by id and deliver it, coalescing concurrent calls.

Publishes that are waiting while a pipeline is in flight are sent together in
the next pipeline, so a hundred tasks that each publish one event cost about
as many round trips as one task publishing batches. A publish that finds no
pipeline in flight sends its own from the caller's task, with no hand-off to
the writer task. If that caller is cancelled after the commands are written,
Redis still runs them but the reply is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection

from hivebus._tasks import TaskSet
from hivebus.connection import TRANSIENT_ERRORS, Redis, retry_transient, translate
from hivebus.errors import HivebusError
from hivebus.keys import Keys

logger = logging.getLogger(__name__)

MAX_BATCH = 500
UNOBSERVED_LOG_INTERVAL = 10.0  # seconds between "reached nobody" lines per channel


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The Pub/Sub listeners and stream consumer groups that one publish reached."""

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
    # The publish deadline counts from here, so time spent queued behind a
    # batch that is waiting for Redis is part of `publish_timeout`.
    queued_at: float = field(default_factory=time.monotonic)


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
        self._in_flight: list[Outgoing] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._unobserved: dict[str, _Unobserved] = defaultdict(_Unobserved)
        self._background = TaskSet()
        self.unobserved_total = 0
        self._uncounted: Counter[str] = Counter()
        self._counting: asyncio.Task[Any] | None = None
        self.redis_reachable = True  # outcome of the latest pipeline sent
        self._connection: AbstractConnection | None = None
        self._reply_timeout: float | None = None  # seconds, for a whole batch

    @property
    def health(self) -> str:
        """``healthy``, or ``degraded`` while the latest pipeline found Redis down."""
        return "healthy" if self.redis_reachable else "degraded"

    async def send(self, items: list[Outgoing]) -> list[PublishResult]:
        """Send ``items`` now if no pipeline is in flight, else queue them for the next.

        Either way, wait for their results.
        """
        if self._in_flight or self._queue or len(items) > MAX_BATCH:
            self._ensure_writer()
            self._queue.extend(items)
            self._wakeup.set()
        else:
            await self._send_now(items)
        if len(items) == 1:
            return [await items[0].future]
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _send_now(self, items: list[Outgoing]) -> None:
        """Flush ``items`` from the caller's task; the writer waits meanwhile."""
        self._in_flight = items
        try:
            await self._flush(items)
        except BaseException:
            for item in items:
                item.future.cancel()
            raise
        finally:
            self._in_flight = []
            if self._queue:
                self._ensure_writer()
                self._wakeup.set()

    def _ensure_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(
                self._write_loop(), name="hivebus-writer"
            )

    async def close(self) -> None:
        """Flush what is queued or in flight, then stop the writer task."""
        pending = [i.future for i in (*self._in_flight, *self._queue)]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        await self._background.wait()
        if self._connection is not None:
            await self._connection.disconnect()
            self._connection = None

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and not self._in_flight:
                batch = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
                self._in_flight = batch
                try:
                    await self._flush(batch)
                    # Callers woken by this batch's results run before this
                    # task resumes. While ``_in_flight`` is still set, their
                    # next publishes queue for one shared pipeline; otherwise
                    # the first would go out alone ahead of the rest.
                    await asyncio.sleep(0)
                finally:
                    self._in_flight = []
                    _fail_unresolved(batch, "the publisher was closed")

    async def _flush(self, batch: list[Outgoing]) -> None:
        waited = time.monotonic() - min(item.queued_at for item in batch)
        try:
            replies = await retry_transient(
                lambda: self._attempt(batch),
                deadline=self._deadline,
                elapsed=waited,
                what=f"publish of {len(batch)} event(s)",
            )
        except redis_errors.RedisError as exc:
            error = translate(exc, f"publish of {len(batch)} event(s)")
            error.__cause__ = exc
            _fail_all(batch, error)
            return
        except Exception as exc:
            _fail_all(batch, exc)
            return
        self._resolve(batch, replies)

    async def _attempt(self, batch: list[Outgoing]) -> list[Any]:
        try:
            replies = await self._execute(batch)
        except TRANSIENT_ERRORS:
            self.redis_reachable = False
            raise
        self.redis_reachable = True
        return replies

    async def _execute(self, batch: list[Outgoing]) -> list[Any]:
        """Send the batch's commands in one pipeline and return their raw replies.

        Per event: SET with PX, then XADD (durable) or PUBLISH (broadcast);
        then XINFO GROUPS once per stream. Error replies come back as
        exception objects in the list, as with redis-py's
        ``Pipeline.execute(raise_on_error=False)``.
        """
        px_ttl = b"$2\r\nPX\r\n" + _bulk(b"%d" % self._ttl_ms)
        targets: dict[tuple[str, bool], bytes] = {}  # RESP bulk of each key
        commands: list[bytes] = []
        for item in batch:
            body = _bulk(item.body)
            key = _bulk(self._keys.event(item.event_id).encode())
            commands.append(b"*5\r\n$3\r\nSET\r\n" + key + body + px_ttl)
            target = targets.get((item.channel, item.durable))
            if target is None:
                name = self._keys.stream if item.durable else self._keys.broadcast
                target = _bulk(name(item.channel).encode())
                targets[(item.channel, item.durable)] = target
            if item.durable:
                commands.append(
                    b"*5\r\n$4\r\nXADD\r\n" + target + b"$1\r\n*\r\n$1\r\ne\r\n" + body
                )
            else:
                commands.append(b"*3\r\n$7\r\nPUBLISH\r\n" + target + body)
        for channel in sorted({i.channel for i in batch if i.durable}):
            stream = self._keys.stream(channel).encode()
            commands.append(_command(b"XINFO", b"GROUPS", stream))
        return await self._round_trip(commands)

    async def _round_trip(self, commands: list[bytes]) -> list[Any]:
        """Write encoded commands on the publisher's connection and read each reply.

        The publisher encodes commands itself and keeps a connection of its
        own, because redis-py's Pipeline and connection pool were the largest
        CPU cost of a publish in ``bench/bench_publish.py``. One timeout
        covers the whole batch. ``_in_flight`` keeps the writer task and the
        callers that send directly to one batch at a time.
        """
        connection = self._own_connection()
        replies: list[Any] = []
        try:
            async with asyncio.timeout(self._reply_timeout):
                await connection.send_packed_command(commands)
                for _ in commands:
                    replies.append(await _read_reply(connection))
        except BaseException:
            # Replies left unread would be taken as the next batch's replies.
            await connection.disconnect(nowait=True)
            raise
        return replies

    def _own_connection(self) -> AbstractConnection:
        """Return the publisher's connection, made with the pool's settings.

        Its client name ends in ``:publisher``, so that CLIENT LIST shows which
        connection it is.
        """
        if self._connection is None:
            pool = self._client.connection_pool
            self._reply_timeout = pool.connection_kwargs.get("socket_timeout")
            options = {**pool.connection_kwargs, "socket_timeout": None}
            if options.get("client_name"):
                options["client_name"] += ":publisher"
            self._connection = pool.connection_class(**options)
        return self._connection

    def _resolve(self, batch: list[Outgoing], replies: list[Any]) -> None:
        group_counts = self._group_counts(batch, replies)
        position = 0
        for item in batch:
            store_reply, delivery_reply = replies[position], replies[position + 1]
            position += 2
            if item.future.done():
                continue
            error = _first_error(store_reply, delivery_reply)
            if error is not None:
                failure = translate(error, f"publish of event {item.event_id!r}")
                failure.__cause__ = error
                item.future.set_exception(failure)
                continue
            if item.durable:
                groups = group_counts.get(item.channel, 0)
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
        """Return the consumer groups per durable channel, from XINFO GROUPS."""
        channels = sorted({i.channel for i in batch if i.durable})
        tail = replies[2 * len(batch) :]
        counts: dict[str, int] = {}
        for channel, reply in zip(channels, tail, strict=True):
            counts[channel] = 0 if isinstance(reply, Exception) else len(reply)
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


def _command(*parts: bytes) -> bytes:
    """Encode one Redis command in RESP, the wire format of requests."""
    return b"*%d\r\n" % len(parts) + b"".join([_bulk(part) for part in parts])


def _bulk(part: bytes) -> bytes:
    """Encode one argument as a RESP bulk string: its length, then its bytes."""
    return b"$%d\r\n%s\r\n" % (len(part), part)


def _first_error(*replies: Any) -> Exception | None:
    """Return the first error reply among ``replies``, or None."""
    for reply in replies:
        if isinstance(reply, Exception):
            return reply
    return None


async def _read_reply(connection: AbstractConnection) -> Any:
    """Return the next reply, or an error reply as its exception object."""
    try:
        return await connection.read_response()
    except redis_errors.ResponseError as exc:
        return exc


def _fail_all(batch: list[Outgoing], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)


def _fail_unresolved(batch: list[Outgoing], reason: str) -> None:
    """Fail the publishes of ``batch`` that have no result, so no caller hangs."""
    unresolved = [item for item in batch if not item.future.done()]
    if unresolved:
        msg = (
            f"publish of {len(unresolved)} event(s) was abandoned because {reason}; "
            "publish again on a running bus"
        )
        _fail_all(unresolved, HivebusError(msg))
