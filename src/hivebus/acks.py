"""Acknowledgements batched across handlers that finish at about the same time.

Each handler that succeeds waits for its own ack. Acks requested while an
earlier batch is in flight go out together in the next one, as one
``XACK stream group id...`` per stream, so a consumer with many handlers in
flight pays one round trip per batch instead of one per entry. An entry of
the redo stream is also deleted, in the same MULTI as its ack, because redo
entries are only kept until they are settled.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass

from hivebus.connection import Redis

logger = logging.getLogger(__name__)

MAX_BATCH = 500


@dataclass(slots=True)
class _Ack:
    stream: str
    entry_id: str
    future: asyncio.Future[None]


class AckBatcher:
    """Send the acks of one consumer group, coalescing concurrent requests."""

    def __init__(self, client: Redis, group: str, *, redo: str) -> None:
        self._client = client
        self._group = group
        self._redo = redo
        self._queue: list[_Ack] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None

    async def ack(self, stream: str, entry_id: str) -> None:
        """Acknowledge one entry; raises what Redis raised for its batch."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Ack(stream, entry_id, future))
        if not self._flushing:
            self._flushing = True
            self._flusher = asyncio.get_running_loop().create_task(self._flush_all())
        await asyncio.shield(future)

    async def _flush_all(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
                await self._flush(batch)
        finally:
            self._flushing = False

    async def _flush(self, batch: list[_Ack]) -> None:
        by_stream: dict[str, list[str]] = defaultdict(list)
        for item in batch:
            by_stream[item.stream].append(item.entry_id)
        redo_ids = by_stream.get(self._redo)
        pipe = self._client.pipeline(transaction=redo_ids is not None)
        for stream, ids in by_stream.items():
            pipe.xack(stream, self._group, *ids)
        if redo_ids:
            pipe.xdel(self._redo, *redo_ids)
        try:
            await pipe.execute()
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item in batch:
            if not item.future.done():
                item.future.set_result(None)
        logger.debug("entries acked group=%s count=%d", self._group, len(batch))
