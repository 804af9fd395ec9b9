"""The dead-letter queue: where events go when they cannot be handled.

Each channel keeps its dead letters in a stream of its own (``P:{CH}:dlq``),
next to the channel's other keys. A dead letter keeps the original event,
or the raw entry if it could not be decoded. It also keeps the subscription,
the reason, the error type and message, a shortened traceback, the attempt
count, the first and last failure times, and the id of the event's original
entry in the channel's stream.

Nothing removes a dead letter but a purge, a replay or the retention limit
(``Settings.dlq_retention``, 7 days by default). Retention is applied by
age, on the server's clock, whenever a dead letter is added or the queue is
read.

Replay appends the original event, with its original id, to the
subscription's redo stream with the attempt count reset to 1, and deletes
the dead letter in the same transaction. ``replay_all`` replays in the
order the events were first appended to the channel, but nothing more is
promised about order: handlers that run concurrently (``concurrency`` above
1), or a later retry, may still run them in another order.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import WatchError

from hivebus.connection import Redis
from hivebus.errors import DeadLetterNotFoundError, HivebusError
from hivebus.keys import Keys, check_channel
from hivebus.scripts import Scripts

logger = logging.getLogger(__name__)

TRACEBACK_LINES = 12
MAX_TEXT = 2000  # characters kept of an error message
BROADCAST_SUBSCRIPTION_PREFIX = "broadcast:"
PAGE = 500  # dead letters read per XREVRANGE call
REPLAY_TRIES = 20  # WATCH conflicts tolerated by one replay


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead-lettered event, as stored.

    Attributes:
        id: the public id, ``CHANNEL/STREAM_ID``.
        subscription: the consumer group that gave up on the event
            (``broadcast:GROUP`` for a broadcast subscription).
        reason: why the event was dead-lettered, in words.
        error_type: class name of the last exception, or empty.
        traceback: the last lines of the last exception's traceback.
        attempts: handler runs before the event was dead-lettered.
        first_failure_ms: when its first attempt failed, in Unix ms.
        last_failure_ms: when it was dead-lettered, in Unix ms.
        origin_id: the event's entry id in the channel's stream, which
            orders the events of a channel by publish time; empty if unknown.
        body: the original event JSON, or the raw entry if it was not JSON.
    """

    id: str
    channel: str
    subscription: str
    reason: str
    error_type: str
    error: str
    traceback: str
    attempts: int
    first_failure_ms: int
    last_failure_ms: int
    event_id: str
    event_type: str
    source: str
    stream_id: str
    origin_id: str
    body: str

    @property
    def event(self) -> dict[str, Any] | None:
        """The original event as JSON, or None if the entry was not valid JSON."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    @property
    def group(self) -> str:
        """The consumer group, without the ``broadcast:`` marker."""
        return self.subscription.removeprefix(BROADCAST_SUBSCRIPTION_PREFIX)

    def matches(self, subscription: str) -> bool:
        """Tell whether ``subscription`` (GROUP or CHANNEL/GROUP) names this one."""
        channel, sep, group = subscription.rpartition("/")
        if sep and channel != self.channel:
            return False
        return group in (self.subscription, self.group)

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as plain JSON values, with the event parsed."""
        data = asdict(self)
        data["event"] = self.event
        data["first_failure"] = _iso(self.first_failure_ms)
        data["last_failure"] = _iso(self.last_failure_ms)
        return data


def make_id(channel: str, stream_id: str) -> str:
    """Return the public id of a dead letter: its channel and stream entry id."""
    return f"{channel}/{stream_id}"


def split_id(dead_letter_id: str) -> tuple[str, str]:
    """Return the channel and stream entry id inside a dead letter's id."""
    channel, sep, stream_id = dead_letter_id.rpartition("/")
    if not sep or not channel or not _stream_id_key(stream_id):
        msg = (
            f"invalid dead-letter id {dead_letter_id!r}: expected CHANNEL/ENTRY_ID "
            "(such as orders/1700000000000-0), as printed by `hivebus dlq list`"
        )
        raise DeadLetterNotFoundError(msg)
    return check_channel(channel), stream_id


def short_traceback(error: BaseException | None) -> str:
    """Return the last lines of ``error``'s traceback, or an empty string."""
    if error is None:
        return ""
    lines = traceback.format_exception(error)
    text = "".join(lines).rstrip().splitlines()
    return "\n".join(line[:300] for line in text[-TRACEBACK_LINES:])


@dataclass(frozen=True, slots=True)
class Failure:
    """The reason an entry is dead-lettered, with the history of its attempts."""

    reason: str
    error: BaseException | None = None
    attempts: int = 0
    first_failure_ms: int = 0


class DeadLetterQueue:
    """Add, list, show, replay and purge dead letters."""

    def __init__(
        self, client: Redis, keys: Keys, scripts: Scripts, *, retention: float
    ) -> None:
        self._client = client
        self._keys = keys
        self._scripts = scripts
        self.retention = retention
        self._retention_ms = int(retention * 1000)

    async def add(
        self,
        *,
        channel: str,
        subscription: str,
        body: bytes | str,
        failure: Failure,
        event: dict[str, Any] | None = None,
        ack: tuple[str, str] | None = None,
        origin_id: str = "",
    ) -> str:
        """Store a dead letter and, if ``ack`` names (stream, entry id), ack it.

        The add and the ack happen in one script, so the entry is never lost
        between them and never both pending and dead-lettered. ``origin_id``
        is the event's entry id in the channel's stream; when it is empty and
        ``ack`` names that stream, the acked entry is the origin.
        """
        if not origin_id and ack is not None and ack[0] == self._keys.stream(channel):
            origin_id = ack[1]
        now_ms = int(time.time() * 1000)
        fields = _fields(subscription, body, failure, event, now_ms)
        fields["channel"] = channel
        fields["origin_id"] = origin_id
        stream, entry_id = ack if ack else (self._keys.dlq(channel), "")
        args: list[Any] = [subscription, entry_id, self._retention_ms]
        for name, value in fields.items():
            args.extend((name, value))
        reply = await self._scripts.dead_letter(
            keys=[self._keys.dlq(channel), stream], args=args
        )
        await self._client.sadd(self._keys.channels, channel)
        dead_letter_id = make_id(channel, _text(reply))
        logger.info(
            "event dead-lettered dead_letter_id=%s event_id=%s subscription=%s "
            "attempts=%d reason=%s",
            dead_letter_id,
            fields["event_id"] or "-",
            subscription,
            failure.attempts,
            failure.reason,
        )
        return dead_letter_id

    async def trim(self, channel: str | None = None) -> int:
        """Remove dead letters older than the retention; return how many went."""
        removed = 0
        for name in await self._channels_of(channel):
            removed += await self._trim_before(name, self._retention_ms)
        return removed

    async def _trim_before(self, channel: str, age_ms: int) -> int:
        seconds, micros = await self._client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        cutoff = max(0, now_ms - age_ms)
        key = self._keys.dlq(channel)
        return int(await self._client.xtrim(key, minid=cutoff, approximate=False))

    async def entries(
        self,
        *,
        channel: str | None = None,
        subscription: str | None = None,
        limit: int = 100,
    ) -> list[DeadLetterEntry]:
        """Return dead letters, newest first, optionally of one channel or subscription.

        ``subscription`` is a group name, or ``CHANNEL/GROUP`` for one group
        on one channel. Dead letters past the retention are trimmed first.
        """
        if channel is None and subscription is not None and "/" in subscription:
            channel = subscription.rpartition("/")[0]
        found: list[DeadLetterEntry] = []
        for name in await self._channels_of(channel):
            await self._trim_before(name, self._retention_ms)
            found.extend(await self._scan(name, subscription, limit))
        found.sort(key=lambda e: e.last_failure_ms, reverse=True)
        return found[:limit]

    async def _scan(
        self, channel: str, subscription: str | None, limit: int
    ) -> list[DeadLetterEntry]:
        """Return up to ``limit`` matching dead letters of a channel, newest first."""
        key = self._keys.dlq(channel)
        found: list[DeadLetterEntry] = []
        upper = "+"
        while len(found) < limit:
            rows = await self._client.xrevrange(key, max=upper, count=PAGE) or []
            for row_id, fields in rows:
                entry = _entry(channel, row_id, fields or {})
                if subscription is None or entry.matches(subscription):
                    found.append(entry)
            if len(rows) < PAGE:
                break
            upper = "(" + _text(rows[-1][0])
        return found[:limit]

    async def channels(self) -> list[str]:
        """Return every channel that has had a durable consumer or dead letter."""
        members = await self._client.smembers(self._keys.channels)
        return sorted(_text(m) for m in members)

    async def _channels_of(self, channel: str | None) -> list[str]:
        return [check_channel(channel)] if channel else await self.channels()

    async def count(self, channel: str | None = None) -> int:
        """Return the number of dead letters, of one channel or all."""
        total = 0
        for name in await self._channels_of(channel):
            await self._trim_before(name, self._retention_ms)
            total += int(await self._client.xlen(self._keys.dlq(name)))
        return total

    async def get(self, dead_letter_id: str) -> DeadLetterEntry:
        """Return one dead letter, or raise if there is none with that id."""
        channel, stream_id = split_id(dead_letter_id)
        rows = await self._client.xrange(
            self._keys.dlq(channel), min=stream_id, max=stream_id
        )
        if not rows:
            raise DeadLetterNotFoundError(_not_found(dead_letter_id))
        row_id, fields = rows[0]
        return _entry(channel, row_id, fields or {})

    async def replay(self, dead_letter_id: str) -> DeadLetterEntry:
        """Deliver a dead letter to its subscription again, with attempts reset.

        The event keeps its id. The re-delivery and the removal run in one
        MULTI/EXEC, so the dead letter leaves the queue only once its
        re-delivery is stored; WATCH on the queue makes two concurrent
        replays of one dead letter deliver it once.
        """
        channel, stream_id = split_id(dead_letter_id)
        key = self._keys.dlq(channel)
        async with self._client.pipeline(transaction=True) as pipe:
            for _ in range(REPLAY_TRIES):
                try:
                    await pipe.watch(key)
                    rows = await pipe.xrange(key, min=stream_id, max=stream_id)
                    if not rows:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        raise DeadLetterNotFoundError(_not_found(dead_letter_id))
                    entry = _entry(channel, rows[0][0], rows[0][1] or {})
                    pipe.multi()  # type: ignore[no-untyped-call]
                    self._queue_redelivery(pipe, entry)
                    pipe.xdel(key, stream_id)
                    await pipe.execute()
                    break
                except WatchError:
                    continue
            else:
                msg = (
                    f"replay of dead letter {dead_letter_id!r} kept conflicting with "
                    f"other writers to its queue ({REPLAY_TRIES} tries); run it again"
                )
                raise HivebusError(msg)
        logger.info(
            "dead letter replayed dead_letter_id=%s event_id=%s subscription=%s",
            dead_letter_id,
            entry.event_id or "-",
            entry.subscription,
        )
        return entry

    def _queue_redelivery(self, pipe: Any, entry: DeadLetterEntry) -> None:
        if entry.subscription.startswith(BROADCAST_SUBSCRIPTION_PREFIX):
            pipe.publish(self._keys.broadcast(entry.channel), entry.body)
            return
        redo = self._keys.redo(entry.channel, entry.subscription)
        fields = {"e": entry.body, "a": "1", "ff": "0", "src": entry.origin_id}
        pipe.xadd(redo, fields)

    async def replay_all(
        self, *, channel: str | None = None, subscription: str | None = None
    ) -> list[DeadLetterEntry]:
        """Replay every matching dead letter, in the order the events were published.

        The order is that of the events' original entries in the channel's
        stream. Dead letters with no known origin follow, in the order they
        were dead-lettered.
        """
        entries = await self.entries(
            channel=channel, subscription=subscription, limit=10**9
        )
        replayed = []
        for entry in sorted(entries, key=_publish_order):
            try:
                replayed.append(await self.replay(entry.id))
            except DeadLetterNotFoundError:
                continue  # replayed or purged by someone else meanwhile
        return replayed

    async def purge(
        self,
        *,
        older_than: float | None = None,
        channel: str | None = None,
        subscription: str | None = None,
    ) -> int:
        """Delete dead letters: all, or those older than ``older_than`` seconds.

        Age is measured from when the event was dead-lettered, on the server's
        clock. ``subscription`` (``GROUP`` or ``CHANNEL/GROUP``) limits the
        purge to one subscription's dead letters.
        """
        removed = 0
        for name in await self._channels_of(channel):
            if subscription is not None:
                removed += await self._purge_matching(name, subscription, older_than)
            elif older_than is None:
                removed += int(await self._client.xlen(self._keys.dlq(name)))
                await self._client.delete(self._keys.dlq(name))
            else:
                removed += await self._trim_before(name, int(older_than * 1000))
        logger.info(
            "dead letters purged count=%d older_than=%s subscription=%s",
            removed,
            older_than,
            subscription,
        )
        return removed

    async def _purge_matching(
        self, channel: str, subscription: str, older_than: float | None
    ) -> int:
        seconds, _ = await self._client.time()
        cutoff = (int(seconds) - (older_than or 0.0)) * 1000
        matching = await self._scan(channel, subscription, 10**9)
        ids = [
            entry.stream_id
            for entry in matching
            if older_than is None or _added_ms(entry) < cutoff
        ]
        if not ids:
            return 0
        return int(await self._client.xdel(self._keys.dlq(channel), *ids))

    async def remove(self, dead_letter_ids: Iterable[str]) -> int:
        """Delete the named dead letters and return how many existed."""
        removed = 0
        for dead_letter_id in dead_letter_ids:
            channel, stream_id = split_id(dead_letter_id)
            removed += int(await self._client.xdel(self._keys.dlq(channel), stream_id))
        return removed


def _fields(
    subscription: str,
    body: bytes | str,
    failure: Failure,
    event: dict[str, Any] | None,
    now_ms: int,
) -> dict[str, Any]:
    event = event or {}
    error = failure.error
    return {
        "body": body,
        "subscription": subscription,
        "reason": failure.reason[:MAX_TEXT],
        "error_type": type(error).__name__ if error else "",
        "error": str(error)[:MAX_TEXT] if error else "",
        "traceback": short_traceback(error),
        "attempts": failure.attempts,
        "first_failure_ms": failure.first_failure_ms,
        "last_failure_ms": now_ms,  # replaced by the server's TIME in the script
        "event_id": str(event.get("id", "")),
        "event_type": str(event.get("type", "")),
        "source": str(event.get("source", "")),
    }


def _not_found(dead_letter_id: str) -> str:
    return (
        f"no dead letter {dead_letter_id!r}: it was replayed, purged or is past "
        "retention; `hivebus dlq list` shows the current ones"
    )


def _stream_id_key(stream_id: str) -> tuple[int, int] | None:
    """Return a stream id as (ms, seq) for sorting, or None if it is not one."""
    ms, sep, seq = stream_id.partition("-")
    if not (ms.isdigit() and sep and seq.isdigit()):
        return None
    return int(ms), int(seq)


def _added_ms(entry: DeadLetterEntry) -> int:
    """Return when a dead letter was added, in server ms, from its stream id."""
    return int(entry.stream_id.partition("-")[0])


def _publish_order(entry: DeadLetterEntry) -> tuple[int, int, int, int]:
    origin = _stream_id_key(entry.origin_id)
    own = _stream_id_key(entry.stream_id) or (0, 0)
    if origin is None:
        return (1, *own, 0)
    return (0, *origin, 0)


def _iso(ms: int) -> str | None:
    if ms <= 0:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _entry(channel: str, row_id: Any, fields: Any) -> DeadLetterEntry:
    values = {_text(k): _text(v) for k, v in fields.items()}
    stream_id = _text(row_id)
    return DeadLetterEntry(
        id=make_id(channel, stream_id),
        channel=channel,
        subscription=values.get("subscription", ""),
        reason=values.get("reason", ""),
        error_type=values.get("error_type", ""),
        error=values.get("error", ""),
        traceback=values.get("traceback", ""),
        attempts=int(values.get("attempts", "0") or 0),
        first_failure_ms=int(values.get("first_failure_ms", "0") or 0),
        last_failure_ms=int(values.get("last_failure_ms", "0") or 0),
        event_id=values.get("event_id", ""),
        event_type=values.get("event_type", ""),
        source=values.get("source", ""),
        stream_id=stream_id,
        origin_id=values.get("origin_id", ""),
        body=values.get("body", ""),
    )
