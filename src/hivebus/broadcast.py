"""Broadcast delivery: one Pub/Sub connection per bus that survives reconnects.

Every broadcast subscription of a bus, and every temporary listener opened
with ``bus.listen``, shares one Pub/Sub connection. When the connection
drops, or Redis restarts, the listener backs off, reconnects and subscribes
to every channel and pattern again. Events published while it was away are
not replayed, but they stay fetchable by id from the event store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Self

from redis import exceptions as redis_errors

from hivebus._tasks import TaskSet
from hivebus.connection import TRANSIENT_ERRORS, Backoff, Redis
from hivebus.errors import (
    InvalidEventError,
    ListenerClosedError,
    RedisUnavailableError,
)
from hivebus.events import Event
from hivebus.keys import Keys
from hivebus.subscription import Subscription

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 10_000  # messages buffered per subscription before new ones are dropped
TAP_QUEUE_LIMIT = 1_000  # messages buffered per temporary listener
READ_TIMEOUT = 1.0  # seconds one read waits before the loop checks its state
# Messages published while the listener is disconnected are lost to it, so
# it retries sooner than the durable consumers, whose entries wait in a stream.
RECONNECT_BASE = 0.2
RECONNECT_CAP = 2.0

# Errors after which the listener drops its connection and reconnects. Other
# replies (an ACL that forbids SUBSCRIBE, say) are retried the same way, so
# that a listener never dies while its bus runs.
RECONNECT_ERRORS: tuple[type[BaseException], ...] = (
    *TRANSIENT_ERRORS,
    redis_errors.RedisError,
)

Dispatch = Callable[[Subscription, str, bytes], Awaitable[None]]
Decode = Callable[[bytes], Event[Any]]


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
            except Exception:
                # Dispatch logs handler errors itself. This catches failures
                # around the handler, such as a dead-letter write while Redis
                # is down, so that the worker goes on with the next message.
                logger.exception(
                    "broadcast message dropped, dispatch failed channel=%s", channel
                )
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


class _TapState:
    """The queue and readiness of one temporary listener, kept by the listener."""

    def __init__(self, name: str, is_pattern: bool) -> None:
        self.name = name
        self.is_pattern = is_pattern
        # None is the end marker that the listener puts when it stops.
        self.queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(
            TAP_QUEUE_LIMIT
        )
        self.ready = asyncio.Event()
        self.dropped = 0

    def offer(self, channel: str, body: bytes) -> None:
        try:
            self.queue.put_nowait((channel, body))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                logger.warning(
                    "temporary listener too slow, messages dropped name=%s dropped=%d",
                    self.name,
                    self.dropped,
                )

    def end(self) -> None:
        """Put the end marker, dropping the oldest message if the queue is full."""
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class BroadcastListener:
    """Listen on Pub/Sub for every broadcast subscription of one bus."""

    def __init__(self, client: Redis, keys: Keys, dispatch: Dispatch) -> None:
        self._client = client
        self._keys = keys
        self._dispatch = dispatch
        self._channels: dict[str, list[_Worker]] = {}
        self._patterns: dict[str, list[_Worker]] = {}
        self._taps: dict[tuple[str, bool], set[_TapState]] = {}
        self._pubsub: Any = None
        self._live = False  # subscribed on the current connection
        self._changes = asyncio.Lock()  # orders SUBSCRIBE and UNSUBSCRIBE sends
        self._background = TaskSet()
        self._stopping = asyncio.Event()
        self._subscribed = asyncio.Event()
        self.health = "starting"
        self.reconnects = 0

    def add(self, sub: Subscription) -> None:
        """Register ``sub``; call before ``run`` or while it runs."""
        name = self._keys.broadcast(sub.channel)
        table = self._patterns if sub.is_pattern else self._channels
        table.setdefault(name, []).append(_Worker(sub, self._dispatch))
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

    # -- the read loop ---------------------------------------------------

    async def run(self, *, drain_timeout: float = 10.0) -> None:
        """Listen until ``stop`` is called, reconnecting whenever Redis drops."""
        logger.info(
            "broadcast listener started channels=%d patterns=%d",
            len(self._channels),
            len(self._patterns),
        )
        reader = asyncio.create_task(self._reconnect_loop(), name="hivebus-pubsub")
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # A read in flight is cancelled rather than awaited, so that a stop
            # takes effect at once; the connection is closed just after.
            for task in (reader, stopping):
                task.cancel()
            await asyncio.gather(reader, stopping, return_exceptions=True)
            await self._shut_down(drain_timeout)
        error = None if reader.cancelled() else reader.exception()
        if error is not None:
            self.health = "failed"
            raise error

    async def _shut_down(self, drain_timeout: float) -> None:
        await self._close()
        for taps in self._taps.values():
            for tap in taps:
                tap.end()
        await self._background.wait()
        workers = [
            w for ws in (*self._channels.values(), *self._patterns.values()) for w in ws
        ]
        await asyncio.gather(*(w.stop(drain_timeout) for w in workers))
        self.health = "stopped"
        logger.info("broadcast listener stopped reconnects=%d", self.reconnects)

    async def _reconnect_loop(self) -> None:
        backoff = Backoff(base=RECONNECT_BASE, cap=RECONNECT_CAP)
        while not self._stopping.is_set():
            try:
                await self._listen(backoff)
            except RECONNECT_ERRORS as exc:
                await self._lost(exc, backoff)

    async def _listen(self, backoff: Backoff) -> None:
        await self._subscribe_all()
        if self.health == "degraded":
            self.reconnects += 1
            logger.info(
                "broadcast listener reconnected and resubscribed reconnects=%d",
                self.reconnects,
            )
        self.health = "healthy"
        backoff.reset()
        while not self._stopping.is_set():
            if not self._subscribed.is_set():
                await self._subscribe_all()
            message = await self._pubsub.get_message(timeout=READ_TIMEOUT)
            if message is not None:
                self._route(message)

    async def _subscribe_all(self) -> None:
        async with self._changes:
            if self._pubsub is None:
                self._pubsub = self._client.pubsub()
            channels = [*self._channels, *(n for n, p in self._taps if not p)]
            patterns = [*self._patterns, *(n for n, p in self._taps if p)]
            if channels:
                await self._pubsub.subscribe(*channels)
            if patterns:
                await self._pubsub.psubscribe(*patterns)
            if not channels and not patterns:
                # Hold a connection even with nothing to subscribe, so that a
                # lost Redis shows up here as it does with subscriptions.
                await self._pubsub.connect()
            self._live = True
            self._subscribed.set()

    def _route(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind in ("subscribe", "psubscribe"):
            self._confirm(_text(message["channel"]), kind == "psubscribe")
            return
        if kind == "pmessage":
            name, is_pattern = _text(message["pattern"]), True
            workers = self._patterns.get(name, [])
        elif kind == "message":
            name, is_pattern = _text(message["channel"]), False
            workers = self._channels.get(name, [])
        else:
            return
        channel = self._keys.channel_of(_text(message["channel"]))
        for worker in workers:
            worker.offer(channel, message["data"])
        for tap in self._taps.get((name, is_pattern), ()):
            tap.offer(channel, message["data"])

    def _confirm(self, name: str, is_pattern: bool) -> None:
        for tap in self._taps.get((name, is_pattern), ()):
            tap.ready.set()

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
        self._live = False
        for taps in self._taps.values():
            for tap in taps:
                tap.ready.clear()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is None:
            return
        try:
            await pubsub.aclose()
        except RECONNECT_ERRORS:
            pass

    # -- temporary listeners ---------------------------------------------

    def register_tap(self, name: str, is_pattern: bool) -> _TapState:
        """Register a temporary listener on ``name``; it is subscribed from now on.

        Every reconnect subscribes it again. ``subscribe_tap`` sends the
        SUBSCRIBE at once on a live connection, and Redis's confirmation sets
        the tap's ``ready`` event.
        """
        tap = _TapState(name, is_pattern)
        self._taps.setdefault((name, is_pattern), set()).add(tap)
        return tap

    async def subscribe_tap(self, tap: _TapState) -> None:
        """Send the SUBSCRIBE (or PSUBSCRIBE) of a registered temporary listener."""
        command = "psubscribe" if tap.is_pattern else "subscribe"
        await self._send_shielded(command, tap.name, only_if_unused=False)

    async def close_tap(self, tap: _TapState) -> None:
        """Remove a temporary listener and unsubscribe if nothing else uses it."""
        key = (tap.name, tap.is_pattern)
        taps = self._taps.get(key, set())
        taps.discard(tap)
        if not taps:
            self._taps.pop(key, None)
        command = "punsubscribe" if tap.is_pattern else "unsubscribe"
        await self._send_shielded(command, tap.name, only_if_unused=True)

    async def _send_shielded(
        self, command: str, name: str, only_if_unused: bool
    ) -> None:
        # The send runs in its own task, so that cancelling the caller cannot
        # cut a command in half on the shared connection.
        task = self._background.spawn(
            self._send(command, name, only_if_unused), name=f"hivebus-{command}"
        )
        await asyncio.shield(task)

    async def _send(self, command: str, name: str, only_if_unused: bool) -> None:
        async with self._changes:
            if not self._live or self._pubsub is None:
                return  # the next (re)subscription includes every open tap
            if only_if_unused and self._in_use(name, command.startswith("p")):
                return
            try:
                await getattr(self._pubsub, command)(name)
            except RECONNECT_ERRORS as exc:
                # The read loop gets the same connection error and reconnects.
                logger.debug("pubsub %s not sent name=%s error=%s", command, name, exc)

    def _in_use(self, name: str, is_pattern: bool) -> bool:
        table = self._patterns if is_pattern else self._channels
        return name in table or (name, is_pattern) in self._taps


class Tap:
    """A temporary subscription to one broadcast channel or pattern.

    Use it as ``async with bus.listen("status") as events:`` and read with
    ``async for event in events`` or ``await events.get()``. The channel is
    subscribed on entry, before the block runs, so events published from
    inside the block reach it. Leaving the block unsubscribes, also when the
    task is cancelled. Messages that cannot be decoded are logged and skipped.
    """

    def __init__(
        self,
        open_listener: Callable[[], Awaitable[BroadcastListener]],
        name: str,
        *,
        is_pattern: bool,
        decode: Decode,
        timeout: float,
    ) -> None:
        self._open_listener = open_listener
        self._name = name
        self._channel = Keys().channel_of(name)  # for messages
        self._is_pattern = is_pattern
        self._decode = decode
        self._timeout = timeout
        self._listener: BroadcastListener | None = None
        self._state: _TapState | None = None

    async def __aenter__(self) -> Self:
        listener = await self._open_listener()
        self._listener = listener
        # Registration has no await, so a cancellation from here on always
        # reaches the cleanup below.
        state = listener.register_tap(self._name, self._is_pattern)
        self._state = state
        try:
            await listener.subscribe_tap(state)
            await asyncio.wait_for(state.ready.wait(), self._timeout)
        except TimeoutError as exc:
            await self._close()
            msg = (
                f"could not subscribe to {self._channel!r} within {self._timeout:.1f}s "
                "because Redis is unreachable; check that the server is up, or pass "
                "a longer `timeout`"
            )
            raise RedisUnavailableError(msg) from exc
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _close(self) -> None:
        state, self._state = self._state, None
        if state is not None and self._listener is not None:
            await self._listener.close_tap(state)

    async def get(self) -> Event[Any]:
        """Wait for the next event on the channel and return it."""
        if self._state is None:
            msg = (
                f"the listener on {self._channel!r} is closed; read from it only "
                "inside its `async with bus.listen(...)` block"
            )
            raise ListenerClosedError(msg)
        while True:
            item = await self._state.queue.get()
            if item is None:
                self._state.end()  # for the reads that follow
                msg = f"the bus stopped while listening on {self._channel!r}"
                raise ListenerClosedError(msg)
            channel, body = item
            try:
                return self._decode(body)
            except InvalidEventError as exc:
                logger.error(
                    "undecodable broadcast message skipped channel=%s error=%s",
                    channel,
                    exc,
                )

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event[Any]:
        try:
            return await self.get()
        except ListenerClosedError:
            raise StopAsyncIteration from None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
