"""The dead-letter queue: where events go when they cannot be handled.

Each channel keeps its dead letters in a stream of its own (``P:{CH}:dlq``),
next to the channel's other keys. A dead letter keeps the original event
(or the raw entry that could not be decoded), the subscription, the error
and the attempt count. Nothing removes it but an explicit purge, a replay or
the retention limit.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from hivebus.connection import Redis
from hivebus.errors import DeadLetterNotFoundError
from hivebus.keys import Keys, check_channel
from hivebus.scripts import Scripts

logger = logging.getLogger(__name__)

TRACEBACK_LINES = 12
BROADCAST_SUBSCRIPTION_PREFIX = "broadcast:"


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead-lettered event, as stored."""

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
    body: str

    @property
    def event(self) -> dict[str, Any] | None:
        """The original event as JSON, or None if the entry was not valid JSON."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as plain JSON values, with the event parsed."""
        data = asdict(self)
        data["event"] = self.event
        return data


def make_id(channel: str, stream_id: str) -> str:
    """Return the public id of a dead letter: its channel and stream entry id."""
    return f"{channel}/{stream_id}"


def split_id(dead_letter_id: str) -> tuple[str, str]:
    """Return the channel and stream entry id inside a dead letter's id."""
    channel, sep, stream_id = dead_letter_id.rpartition("/")
    if not sep or not channel or not stream_id:
        msg = (
            f"invalid dead-letter id {dead_letter_id!r}: expected CHANNEL/ENTRY_ID, "
            "as printed by `hivebus dlq list`"
        )
        raise DeadLetterNotFoundError(msg)
    return check_channel(channel), stream_id


def short_traceback(error: BaseException | None) -> str:
    """Return the last lines of ``error``'s traceback, or an empty string."""
    if error is None:
        return ""
    lines = traceback.format_exception(error)
    text = "".join(lines).rstrip().splitlines()
    return "\n".join(text[-TRACEBACK_LINES:])


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an entry is being dead-lettered, and the history of its attempts."""

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
    ) -> str:
        """Store a dead letter and, if ``ack`` names (stream, entry id), ack it.

        The add and the ack happen in one script, so the entry is never lost
        between them and never both pending and dead-lettered.
        """
        now_ms = int(time.time() * 1000)
        fields = self._fields(channel, subscription, body, failure, event, now_ms)
        stream, entry_id = ack if ack else ("", "")
        keys = [self._keys.dlq(channel), stream or self._keys.dlq(channel)]
        args: list[Any] = [subscription, entry_id, self._retention_ms]
        for name, value in fields.items():
            args.extend((name, value))
        reply = await self._scripts.dead_letter(keys=keys, args=args)
        await self._client.sadd(self._keys.channels, channel)
        dead_letter_id = make_id(channel, _text(reply))
        logger.info(
            "event dead-lettered dead_letter_id=%s event_id=%s subscription=%s "
            "attempts=%d reason=%s",
            dead_letter_id,
            fields["event_id"],
            subscription,
            failure.attempts,
            failure.reason,
        )
        return dead_letter_id

    @staticmethod
    def _fields(
        channel: str,
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
            "channel": channel,
            "subscription": subscription,
            "reason": failure.reason,
            "error_type": type(error).__name__ if error else "",
            "error": str(error) if error else "",
            "traceback": short_traceback(error),
            "attempts": failure.attempts,
            "first_failure_ms": failure.first_failure_ms or now_ms,
            "last_failure_ms": now_ms,
            "event_id": str(event.get("id", "")),
            "event_type": str(event.get("type", "")),
            "source": str(event.get("source", "")),
        }

    async def entries(
        self,
        *,
        channel: str | None = None,
        subscription: str | None = None,
        limit: int = 100,
    ) -> list[DeadLetterEntry]:
        """Return dead letters, newest first, optionally for one channel or group."""
        channels = [channel] if channel else await self.channels()
        entries: list[DeadLetterEntry] = []
        for name in channels:
            rows = await self._client.xrevrange(self._keys.dlq(name), count=limit)
            entries.extend(
                _entry(name, row_id, fields) for row_id, fields in rows or []
            )
        if subscription:
            entries = [e for e in entries if e.subscription == subscription]
        entries.sort(key=lambda e: e.last_failure_ms, reverse=True)
        return entries[:limit]

    async def channels(self) -> list[str]:
        """Return every channel that has had a durable consumer or dead letter."""
        members = await self._client.smembers(self._keys.channels)
        return sorted(_text(m) for m in members)

    async def count(self, channel: str | None = None) -> int:
        """Return the number of dead letters, for one channel or all."""
        channels = [channel] if channel else await self.channels()
        total = 0
        for name in channels:
            total += int(await self._client.xlen(self._keys.dlq(name)))
        return total

    async def get(self, dead_letter_id: str) -> DeadLetterEntry:
        """Return one dead letter, or raise if there is none with that id."""
        channel, stream_id = split_id(dead_letter_id)
        rows = await self._client.xrange(
            self._keys.dlq(channel), min=stream_id, max=stream_id
        )
        if not rows:
            msg = (
                f"no dead letter {dead_letter_id!r}: it was replayed, purged or is "
                "past retention; `hivebus dlq list` shows the current ones"
            )
            raise DeadLetterNotFoundError(msg)
        row_id, fields = rows[0]
        return _entry(channel, row_id, fields or {})

    async def replay(self, dead_letter_id: str) -> DeadLetterEntry:
        """Deliver a dead letter to its subscription again, with attempts reset.

        The re-delivery and the removal run in one transaction, so the entry
        leaves the queue only once its re-delivery is stored.
        """
        entry = await self.get(dead_letter_id)
        channel, stream_id = split_id(dead_letter_id)
        pipe = self._client.pipeline(transaction=True)
        if entry.subscription.startswith(BROADCAST_SUBSCRIPTION_PREFIX):
            pipe.publish(self._keys.broadcast(channel), entry.body)
        else:
            redo = self._keys.redo(channel, entry.subscription)
            first_ms = str(int(time.time() * 1000))
            pipe.xadd(redo, {"e": entry.body, "a": "1", "ff": first_ms, "src": ""})
        pipe.xdel(self._keys.dlq(channel), stream_id)
        await pipe.execute()
        logger.info(
            "dead letter replayed dead_letter_id=%s event_id=%s subscription=%s",
            dead_letter_id,
            entry.event_id,
            entry.subscription,
        )
        return entry

    async def replay_all(
        self, *, channel: str | None = None, subscription: str | None = None
    ) -> list[DeadLetterEntry]:
        """Replay every matching dead letter, oldest first (original order)."""
        entries = await self.entries(
            channel=channel, subscription=subscription, limit=1_000_000
        )
        replayed = []
        for entry in sorted(entries, key=lambda e: e.id):
            replayed.append(await self.replay(entry.id))
        return replayed

    async def purge(
        self, *, older_than: float | None = None, channel: str | None = None
    ) -> int:
        """Delete dead letters, all or those older than ``older_than`` seconds."""
        channels = [channel] if channel else await self.channels()
        removed = 0
        for name in channels:
            key = self._keys.dlq(name)
            if older_than is None:
                removed += int(await self._client.xlen(key))
                await self._client.delete(key)
                continue
            seconds, micros = await self._client.time()
            cutoff = int(seconds) * 1000 + int(micros) // 1000 - int(older_than * 1000)
            removed += int(await self._client.xtrim(key, minid=f"{max(cutoff, 0)}-0"))
        logger.info("dead letters purged count=%d older_than=%s", removed, older_than)
        return removed

    async def remove(self, dead_letter_ids: Iterable[str]) -> int:
        """Delete the named dead letters and return how many existed."""
        removed = 0
        for dead_letter_id in dead_letter_ids:
            channel, stream_id = split_id(dead_letter_id)
            removed += int(await self._client.xdel(self._keys.dlq(channel), stream_id))
        return removed


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
        body=values.get("body", ""),
    )
