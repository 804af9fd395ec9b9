"""Subscriptions and what a handler receives with each delivery."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hivebus.breaker import BreakerConfig
from hivebus.events import Event
from hivebus.retry import RetryPolicy

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from hivebus.connection import Redis
    from hivebus.keys import Keys

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Subscription:
    """A handler bound to a channel, with the options of its delivery.

    A durable subscription reads the channel's stream in consumer group
    ``group``: every group gets every event once, and the processes in one
    group share the work. A broadcast subscription gets what is published on
    Pub/Sub while it listens, and may use a channel pattern such as
    ``orders.*``.
    """

    channel: str
    handler: Handler
    durable: bool
    group: str
    concurrency: int = 16
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    claim_timeout: float = 30.0
    handler_timeout: float | None = None
    batch: int = 100
    raw: bool = False
    types: frozenset[str] | None = None
    breaker: BreakerConfig | str | None = None
    from_start: bool = True
    wants_delivery: bool = False

    @property
    def name(self) -> str:
        """The subscription's name in logs and dead letters: ``channel/group``."""
        return f"{self.channel}/{self.group}"

    @property
    def is_pattern(self) -> bool:
        """Whether the channel is a pattern (broadcast only)."""
        return "*" in self.channel or "?" in self.channel


def takes_delivery(handler: Handler) -> bool:
    """Tell whether ``handler`` accepts a second, ``Delivery`` argument."""
    parameters = [
        p
        for p in inspect.signature(handler).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(parameters) >= 2


@dataclass(slots=True)
class Delivery:
    """Facts about one delivery of an event, and an idempotency helper.

    Attributes:
        attempt: the handler run this is for this event in this group, from 1.
        delivery_count: how often Redis handed out this stream entry; above 1
            after a consumer died or stalled while holding it.
        subscription: the subscription's name, ``channel/group``.
        entry_id: the stream entry id (empty for broadcast).
    """

    event: Event[Any]
    attempt: int
    delivery_count: int
    subscription: str
    entry_id: str
    _client: Redis = field(repr=False)
    _keys: Keys = field(repr=False)
    _channel: str = field(repr=False)
    _group: str = field(repr=False)
    _ttl_ms: int = field(repr=False)

    def _marker(self, key: str) -> str:
        return self._keys.once(self._channel, f"{self._group}:{self.event.id}:{key}")

    async def once(self, key: str, effect: Callable[[Pipeline], Any]) -> bool:
        """Apply a Redis side effect once per event, however often it is delivered.

        ``effect`` queues commands on a transaction pipeline. They run in the
        same MULTI/EXEC as the marker that records them, so a crash can never
        leave the effect applied without the marker, or the reverse. Returns
        True if the effect ran now and False if it had run before.
        """
        marker = self._marker(key)
        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(marker)
                    if await pipe.exists(marker):
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return False
                    pipe.multi()  # type: ignore[no-untyped-call]
                    effect(pipe)
                    pipe.set(marker, "1", px=self._ttl_ms)
                    await pipe.execute()
                    return True
                except _watch_error():
                    continue

    async def run_once(self, key: str, action: Callable[[], Awaitable[Any]]) -> bool:
        """Run ``action`` unless it already succeeded for this event and key.

        The marker is written after ``action`` returns, so an action outside
        Redis runs again if the process dies between the two; use ``once`` for
        Redis side effects that must happen exactly once.
        """
        marker = self._marker(key)
        if await self._client.exists(marker):
            return False
        await action()
        await self._client.set(marker, "1", px=self._ttl_ms)
        return True


def _watch_error() -> type[Exception]:
    from redis.exceptions import WatchError

    return WatchError
