"""Broadcast delivery: one Pub/Sub connection per bus that survives reconnects.

Every broadcast subscription of a bus shares one Pub/Sub connection. When the
connection drops, or Redis restarts, the listener backs off, reconnects and
subscribes to every channel and pattern again. Events published while it was
away are not replayed, but they stay fetchable by id from the event store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from hivebus.connection import TRANSIENT_ERRORS, Backoff, Redis
from hivebus.keys import Keys
from hivebus.subscription import Subscription

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 10_000  # messages buffered per subscription before new ones are dropped
READ_TIMEOUT = 1.0  # seconds one read waits, so that a stop is noticed quickly

Dispatch = Callable[[Subscription, str, bytes], Awaitable[None]]


class _Worker:
    """A bounded queue and a pool of tasks that run one subscription's handler."""

    def __init__(self, sub: Subscription, dispatch: Dispatch) -> None:
        self.sub = sub
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(QUEUE_LIMIT)
        self.dropped = 0
        self._dispatch = dispatch
        self._tasks = [
            asyncio.create_task(self._run(), name=f"hivebus-broadcast-{sub.channel}")
            for _ in range(sub.concurrency)
        ]

    def offer(self, channel: str, body: bytes) -> None:
        try:
            self.queue.put_nowait((channel, body))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                logger.warning(
                    "broadcast handler too slow, messages dropped "
                    "channel=%s dropped=%d",
                    self.sub.channel,
                    self.dropped,
                )

    async def _run(self) -> None:
        while True:
            channel, body = await self.queue.get()
            try:
                await self._dispatch(self.sub, channel, body)
            finally:
                self.queue.task_done()

    async def stop(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.queue.join(), timeout)
        except TimeoutError:
            logger.warning(
                "broadcast messages left unhandled at shutdown channel=%s count=%d",
                self.sub.channel,
                self.queue.qsize(),
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class BroadcastListener:
    """Listen on Pub/Sub for every broadcast subscription of one bus."""

    def __init__(self, client: Redis, keys: Keys, dispatch: Dispatch) -> None:
        self._client = client
        self._keys = keys
        self._dispatch = dispatch
        self._channels: dict[str, list[_Worker]] = {}
        self._patterns: dict[str, list[_Worker]] = {}
        self._pubsub: Any = None
        self._stopping = asyncio.Event()
        self._subscribed = asyncio.Event()
        self.health = "starting"
        self.reconnects = 0

    def add(self, sub: Subscription) -> None:
        """Register ``sub``; call before ``run`` or while it runs."""
        name = self._keys.broadcast(sub.channel)
        table = self._patterns if sub.is_pattern else self._channels
        table.setdefault(name, []).append(_Worker(sub, self._dispatch))
        if self._pubsub is not None and self._subscribed.is_set():
            self._subscribed.clear()

    @property
    def empty(self) -> bool:
        """Whether no broadcast subscription is registered."""
        return not self._channels and not self._patterns

    async def wait_subscribed(self) -> None:
        """Wait until every registered channel and pattern is subscribed."""
        await self._subscribed.wait()

    def stop(self) -> None:
        """Ask the listener to stop."""
        self._stopping.set()

    async def run(self, *, drain_timeout: float = 10.0) -> None:
        """Listen until ``stop`` is called, reconnecting whenever Redis drops."""
        backoff = Backoff(base=0.2, cap=5.0)
        logger.info(
            "broadcast listener started channels=%d patterns=%d",
            len(self._channels),
            len(self._patterns),
        )
        try:
            while not self._stopping.is_set():
                try:
                    await self._listen(backoff)
                except TRANSIENT_ERRORS as exc:
                    await self._lost(exc, backoff)
        finally:
            await self._close()
            workers = [
                w
                for ws in (*self._channels.values(), *self._patterns.values())
                for w in ws
            ]
            await asyncio.gather(*(w.stop(drain_timeout) for w in workers))
            self.health = "stopped"
            logger.info("broadcast listener stopped reconnects=%d", self.reconnects)

    async def _listen(self, backoff: Backoff) -> None:
        await self._subscribe_all()
        if self.health == "degraded":
            self.reconnects += 1
            logger.info("broadcast listener reconnected and resubscribed")
        self.health = "healthy"
        backoff.reset()
        while not self._stopping.is_set():
            if not self._subscribed.is_set():
                await self._subscribe_all()
            message = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=READ_TIMEOUT
            )
            if message is not None:
                self._route(message)

    async def _subscribe_all(self) -> None:
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        if self._channels:
            await self._pubsub.subscribe(*self._channels)
        if self._patterns:
            await self._pubsub.psubscribe(*self._patterns)
        self._subscribed.set()

    def _route(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "pmessage":
            workers = self._patterns.get(_text(message["pattern"]), [])
        elif kind == "message":
            workers = self._channels.get(_text(message["channel"]), [])
        else:
            return
        channel = self._keys.channel_of(_text(message["channel"]))
        for worker in workers:
            worker.offer(channel, message["data"])

    async def _lost(self, error: BaseException, backoff: Backoff) -> None:
        delay = backoff.next_delay()
        self.health = "degraded"
        self._subscribed.clear()
        logger.error(
            "broadcast connection lost, reconnecting attempt=%d delay=%.2fs error=%s",
            backoff.attempt,
            delay,
            error,
        )
        await self._close()
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        except TimeoutError:
            pass

    async def _close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is None:
            return
        try:
            await pubsub.aclose()
        except TRANSIENT_ERRORS:
            pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
