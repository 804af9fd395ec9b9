"""A consumer's view of its group's pending entries: leases and takeovers.

Redis keeps, per consumer group, a pending entries list (PEL): each entry
that was delivered and not yet acked, with its owner, idle time and
delivery count. A consumer keeps the entries it is handling by resetting
their idle time (its lease), and takes over the entries that another
consumer left idle past the claim timeout, which means that consumer died
or stalled.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Collection, Iterable
from typing import Any

from hivebus.connection import TRANSIENT_ERRORS, Redis
from hivebus.handling import ConsumerStats, Entry, EntryHandler
from hivebus.subscription import Subscription

logger = logging.getLogger(__name__)

STALE_SCAN = 50  # pending entries inspected per stream in one look for stale ones

EntryKey = tuple[str, str]


class PendingEntries:
    """Renew the leases of one consumer's entries and claim stale ones."""

    def __init__(
        self,
        subscription: Subscription,
        *,
        client: Redis,
        consumer_name: str,
        streams: tuple[str, ...],
        handler: EntryHandler,
        stats: ConsumerStats,
    ) -> None:
        self.sub = subscription
        self._client = client
        self._me = consumer_name
        self._streams = streams
        self._handler = handler
        self._stats = stats
        self._idle_ms = int(subscription.claim_timeout * 1000)

    # -- leases ----------------------------------------------------------

    async def keep_leases(self, in_flight: Collection[EntryKey]) -> None:
        """Renew the leases of ``in_flight`` three times per claim timeout.

        ``in_flight`` is the consumer's live collection of entries being
        handled. This runs until cancelled.
        """
        interval = self.sub.claim_timeout / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew(list(in_flight))
            except TRANSIENT_ERRORS as exc:
                logger.warning(
                    "lease renewal failed subscription=%s error=%s", self.sub.name, exc
                )
            except Exception:
                logger.exception("lease renewal failed subscription=%s", self.sub.name)

    async def renew(self, keys: Iterable[EntryKey]) -> None:
        """Reset the idle time of entries being handled, so no peer claims them.

        XCLAIM with JUSTID resets the idle time without counting a delivery.
        Only entries this consumer still owns are renewed: one that a peer
        claimed after a stall stays with that peer. An entry trimmed from
        its stream is not renewed either, because XCLAIM would drop it from
        the pending list, and a crash would then lose it without a trace.
        """
        by_stream: dict[str, list[str]] = defaultdict(list)
        for stream, entry_id in keys:
            by_stream[stream].append(entry_id)
        for stream, ids in by_stream.items():
            owned = await self._owned(stream, ids)
            if owned:
                await self._client.xclaim(
                    stream, self.sub.group, self._me, 0, list(owned), justid=True
                )

    async def _owned(self, stream: str, ids: list[str]) -> list[str]:
        """Return the ids in ``ids`` that this consumer owns and that still exist."""
        async with self._client.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(stream, self.sub.group, entry_id, entry_id, 1)
                pipe.xrange(stream, min=entry_id, max=entry_id)
            replies = await pipe.execute()
        owned = []
        for index, entry_id in enumerate(ids):
            rows, body = replies[2 * index], replies[2 * index + 1]
            owner = _text(rows[0]["consumer"]) if rows else None
            if owner == self._me and body:
                owned.append(entry_id)
            elif owner == self._me:
                self._note_trimmed(stream, entry_id)
            elif owner is not None:
                logger.warning(
                    "lease lost, a peer claimed an entry still being handled "
                    "subscription=%s entry_id=%s owner=%s",
                    self.sub.name,
                    entry_id,
                    owner,
                )
        return owned

    def _note_trimmed(self, stream: str, entry_id: str) -> None:
        """Remember an entry trimmed from its stream while its handler runs.

        The handler goes on with the body it holds. If it is cancelled, the
        entry is dead-lettered with that body. If it runs past the claim
        timeout, a peer may claim the pending id and report it trimmed.
        NOTE: that report comes even when the handler here then succeeds.
        """
        key = (stream, entry_id)
        if key in self._handler.trimmed:
            return
        logger.warning(
            "entry trimmed from the stream while its handler runs "
            "subscription=%s stream=%s entry_id=%s",
            self.sub.name,
            stream,
            entry_id,
        )
        self._handler.trimmed.add(key)

    # -- takeovers -------------------------------------------------------

    async def find_stale(self, busy: Collection[EntryKey]) -> list[EntryKey]:
        """Return entries idle past the claim timeout, lowest delivery count first.

        Entries in ``busy`` (this consumer's own) are left out. Only the
        first ``STALE_SCAN`` stale entries of each stream, in id order, are
        looked at.
        """
        found: list[tuple[int, tuple[int, int], str, str]] = []
        for stream in self._streams:
            rows = await self._client.xpending_range(
                stream, self.sub.group, "-", "+", STALE_SCAN, idle=self._idle_ms
            )
            for row in rows:
                entry_id = _text(row["message_id"])
                if (stream, entry_id) not in busy:
                    count = int(row["times_delivered"])
                    found.append((count, _id_order(entry_id), stream, entry_id))
        found.sort()
        return [(stream, entry_id) for _, _, stream, entry_id in found]

    async def claim(self, stream: str, entry_id: str) -> Entry | None:
        """Claim the stale entry at or after ``entry_id``, counting a delivery.

        XAUTOCLAIM settles a race between consumers for one entry, because it
        claims only what is still idle past the claim timeout. It also names
        each pending entry that was trimmed from the stream to exactly one
        caller, which dead-letters it.
        """
        reply: Any = await self._client.xautoclaim(
            stream, self.sub.group, self._me, self._idle_ms, start_id=entry_id, count=1
        )
        deleted = [_text(i) for i in (reply[2] if len(reply) > 2 else [])]
        if deleted:
            await self._handler.report_trimmed(stream, deleted)
        claimed = [(_text(i), f) for i, f in reply[1] if f is not None]
        if not claimed:
            return None

        claimed_id, fields = claimed[0]
        count = await self._delivery_count(stream, claimed_id)
        self._stats.claimed += 1
        logger.warning(
            "claimed entry left pending by a stalled or dead consumer, running it "
            "alone subscription=%s stream=%s entry_id=%s delivery_count=%d",
            self.sub.name,
            stream,
            claimed_id,
            count,
        )
        return Entry(stream, claimed_id, fields, count)

    async def _delivery_count(self, stream: str, entry_id: str) -> int:
        rows = await self._client.xpending_range(
            stream, self.sub.group, entry_id, entry_id, 1
        )
        return int(rows[0]["times_delivered"]) if rows else 1


def _id_order(entry_id: str) -> tuple[int, int]:
    """Return a stream entry id as numbers, so that ids sort in stream order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
