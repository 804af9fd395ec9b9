"""The ``Bus``: publish events, subscribe handlers, and run the consumers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Self, TypeVar, cast

from pydantic import BaseModel

from hivebus import codec, metrics, tracing
from hivebus._tasks import TaskSet
from hivebus.breaker import BreakerConfig, CircuitBreaker, State
from hivebus.broadcast import BroadcastListener, Tap
from hivebus.config import Settings, redact_url
from hivebus.connection import (
    TRANSIENT_ERRORS,
    Redis,
    check_server,
    connect,
    process_id,
    retry_transient,
    translate,
)
from hivebus.consumer import DurableConsumer
from hivebus.dlq import BROADCAST_SUBSCRIPTION_PREFIX, DeadLetterQueue, Failure
from hivebus.errors import ConfigError, EventNotFoundError, InvalidEventError
from hivebus.events import Event, EventTypes
from hivebus.keys import Keys, check_channel, check_name, check_pattern
from hivebus.publisher import Outgoing, Publisher, PublishResult
from hivebus.retry import RetryPolicy
from hivebus.rpc import DEFAULT_TIMEOUT, ContextRef, Requester, Responders
from hivebus.scripts import Scripts
from hivebus.subscription import Handler, Subscription, takes_delivery

logger = logging.getLogger(__name__)

HandlerT = TypeVar("HandlerT", bound=Handler)

ERRORS_CHANNEL = "hivebus.errors"
DEAD_LETTERED_TYPE = "hivebus.deadlettered"
BREAKER_CHANNEL = "hivebus.breakers"
BREAKER_CHANGED_TYPE = "hivebus.breaker.changed"


class Bus:
    """An event bus on one Redis (or the in-process ``memory://`` backend).

    Use it as an async context manager, or call ``start`` and ``stop``::

        bus = Bus("redis://127.0.0.1:6379/0", service="billing")

        @bus.subscribe("orders", durable=True)
        async def on_order(event: Event[OrderPlaced]) -> None: ...

        async with bus:
            await bus.publish("orders", OrderPlaced(order_id="o-1"), durable=True)
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        types: EventTypes | None = None,
        **overrides: Any,
    ) -> None:
        if settings is None:
            options: dict[str, Any] = {"redis_url": url} if url else {}
            settings = Settings(**options, **overrides)
        elif url or overrides:
            settings = settings.model_copy(
                update={**({"redis_url": url} if url else {}), **overrides}
            )
        self.settings = settings
        self.types = types or EventTypes()
        self.keys = Keys(settings.prefix)
        self.process_id = settings.consumer_name or process_id()
        self._subscriptions: list[Subscription] = []
        self._consumers: list[DurableConsumer] = []
        self._breakers: dict[str, CircuitBreaker] = {}
        self._tasks = TaskSet()
        self._client: Redis | None = None
        self._reader: Redis | None = None
        self._publisher: Publisher | None = None
        self._listener: BroadcastListener | None = None
        self._scripts: Scripts | None = None
        self._dlq: DeadLetterQueue | None = None
        self._started = False
        self._unobserved_earlier = 0
        self._requester = Requester(self)
        self._responders = Responders(self)

    def __repr__(self) -> str:
        return (
            f"Bus(url={redact_url(self.settings.redis_url)!r}, "
            f"service={self.settings.service!r})"
        )

    # -- connection ------------------------------------------------------

    @property
    def client(self) -> Redis:
        """The command client; available once the bus is connected."""
        if self._client is None:
            msg = (
                "the bus is not connected: use `async with bus:` or `await bus.start()`"
            )
            raise ConfigError(msg)
        return self._client

    @property
    def scripts(self) -> Scripts:
        """The registered Lua scripts; available once the bus is connected."""
        if self._scripts is None:
            self.client  # noqa: B018 - raises the "not connected" error
        assert self._scripts is not None
        return self._scripts

    @property
    def dlq(self) -> DeadLetterQueue:
        """The dead-letter queue; available once the bus is connected."""
        if self._dlq is None:
            self.client  # noqa: B018 - raises the "not connected" error
        assert self._dlq is not None
        return self._dlq

    async def connect(self) -> None:
        """Open the connections and check the server, without starting consumers."""
        if self._client is not None:
            return
        name = f"hivebus:{self.settings.service}:{self.process_id}"
        client = connect(self.settings, client_name=name)
        try:
            await retry_transient(
                lambda: check_server(client, self.settings),
                deadline=self.settings.publish_timeout,
                what=f"connecting to {redact_url(self.settings.redis_url)}",
            )
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._scripts = Scripts(client)
        self._dlq = DeadLetterQueue(
            client, self.keys, self._scripts, retention=self.settings.dlq_retention
        )
        self._publisher = Publisher(
            client,
            self.keys,
            event_ttl=self.settings.event_ttl,
            deadline=self.settings.publish_timeout,
        )
        logger.info(
            "bus connected url=%s service=%s process=%s",
            redact_url(self.settings.redis_url),
            self.settings.service,
            self.process_id,
        )

    async def start(self) -> None:
        """Connect and start every subscription's consumer."""
        await self.connect()
        if self._started:
            return
        self._started = True
        for sub in self._subscriptions:
            self._launch(sub)
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Wait until every consumer group exists and broadcasts are subscribed."""
        for consumer in self._consumers:
            await consumer.wait_ready()
        if self._listener is not None and not self._listener.empty:
            await self._listener.wait_subscribed()

    async def stop(self, *, drain_timeout: float = 30.0) -> None:
        """Stop consuming, finish or release in-flight work, flush and disconnect."""
        await self._requester.close()
        for consumer in self._consumers:
            consumer.stop(drain_timeout=drain_timeout)
        if self._listener is not None:
            self._listener.stop()
        await self._tasks.wait()
        await self._responders.close()
        self._consumers.clear()
        self._listener = None
        self._started = False
        if self._publisher is not None:
            await self._publisher.close()
            self._unobserved_earlier += self._publisher.unobserved_total
        await metrics.close(self._client)
        for client in (self._reader, self._client):
            if client is not None:
                await client.aclose()
        self._client = self._reader = None
        self._publisher = None
        logger.info(
            "bus stopped service=%s process=%s", self.settings.service, self.process_id
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run_forever(self) -> None:
        """Start, then serve until cancelled (for worker processes)."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())

    # -- subscribing -----------------------------------------------------

    def subscribe(
        self,
        channel: str,
        *,
        durable: bool = False,
        group: str | None = None,
        concurrency: int = 16,
        retry: RetryPolicy | None = None,
        claim_timeout: float = 30.0,
        handler_timeout: float | None = None,
        batch: int = 100,
        raw: bool = False,
        types: Iterable[str] | None = None,
        breaker: BreakerConfig | str | None = None,
        from_start: bool = True,
    ) -> Callable[[HandlerT], HandlerT]:
        """Register an async handler for ``channel``.

        Args:
            durable: read the channel's stream in consumer group ``group``
                (at-least-once, acked after the handler returns) instead of
                listening on Pub/Sub.
            group: consumer group; defaults to the bus's service name.
            concurrency: handler runs in flight at once, per process.
            retry: retry policy of a durable subscription.
            claim_timeout: seconds an entry may sit unacked by a dead consumer
                before a live one claims it. Live handlers keep their entries.
            handler_timeout: seconds before a handler run is cancelled and
                counted as failed; None for no limit.
            raw: accept event types with no registered model, as plain JSON.
            types: only these event types reach the handler; others are acked.
            breaker: a breaker config, or the name of a breaker made with
                ``bus.breaker``, that guards the handler.
            from_start: a new group starts at the oldest retained entry
                (True) or at entries published after it is created (False).
        """
        if durable:
            check_channel(channel)
        else:
            check_pattern(channel)
        if durable and ("*" in channel or "?" in channel):
            msg = (
                f"durable channel {channel!r} cannot be a pattern; "
                "subscribe to each channel instead"
            )
            raise ConfigError(msg)
        if concurrency < 1 or batch < 1 or claim_timeout <= 0:
            msg = (
                f"`concurrency` ({concurrency!r}) and `batch` ({batch!r}) must be at "
                f"least 1 and `claim_timeout` ({claim_timeout!r}) above 0"
            )
            raise ConfigError(msg)

        def register(handler: HandlerT) -> HandlerT:
            if not asyncio.iscoroutinefunction(handler):
                msg = f"handler {handler!r} must be an async function (async def)"
                raise ConfigError(msg)
            sub = Subscription(
                channel=channel,
                handler=handler,
                durable=durable,
                group=check_name("group", group or self.settings.service),
                concurrency=concurrency,
                retry=retry or RetryPolicy(),
                claim_timeout=claim_timeout,
                handler_timeout=handler_timeout,
                batch=batch,
                raw=raw,
                types=frozenset(types) if types is not None else None,
                breaker=breaker,
                from_start=from_start,
                wants_delivery=takes_delivery(handler),
            )
            self._subscriptions.append(sub)
            if self._started:
                self._launch(sub)
            return cast(HandlerT, handler)

        return register

    def _launch(self, sub: Subscription) -> None:
        if sub.durable:
            consumer = self._make_consumer(sub)
            self._consumers.append(consumer)
            self._tasks.spawn(consumer.run(), name=f"hivebus-consumer-{sub.name}")
            return
        self._broadcast_listener().add(sub)

    def _broadcast_listener(self) -> BroadcastListener:
        """Return the bus's Pub/Sub listener, starting it on first use."""
        if self._listener is None:
            self._listener = BroadcastListener(self.client, self.keys, self._dispatch)
            self._tasks.spawn(self._listener.run(), name="hivebus-broadcast")
        return self._listener

    def listen(
        self, channel: str, *, raw: bool = False, timeout: float | None = None
    ) -> Tap:
        """Subscribe to a broadcast channel or pattern for one ``async with`` block.

        ``async with bus.listen("status.*") as events:`` subscribes before the
        block runs, and ``async for event in events`` reads what arrives. It
        shares the bus's one Pub/Sub connection. ``timeout`` is the number of
        seconds to wait for the subscription while Redis is unreachable
        (default: `publish_timeout`); then it raises RedisUnavailableError.
        """
        check_pattern(channel)

        async def open_listener() -> BroadcastListener:
            await self.connect()
            return self._broadcast_listener()

        def decode(body: bytes) -> Event[Any]:
            return codec.decode(
                body, self.types, self.settings.max_event_bytes, raw=raw
            )

        return Tap(
            open_listener,
            self.keys.broadcast(channel),
            is_pattern="*" in channel or "?" in channel,
            decode=decode,
            timeout=self.settings.publish_timeout if timeout is None else timeout,
        )

    def _make_consumer(self, sub: Subscription) -> DurableConsumer:
        breaker = None
        if isinstance(sub.breaker, str):
            breaker = self.breaker(sub.breaker)
        elif sub.breaker is not None:
            breaker = self.breaker(f"{sub.channel}.{sub.group}", sub.breaker)
        return DurableConsumer(
            sub,
            client=self.client,
            reader=self._blocking_client(),
            keys=self.keys,
            scripts=self.scripts,
            dlq=self.dlq,
            types=self.types,
            consumer_name=self.process_id,
            max_event_bytes=self.settings.max_event_bytes,
            event_ttl=self.settings.event_ttl,
            stream_retention=self.settings.stream_retention,
            breaker=breaker,
            on_dead_letter=self._announce_dead_letter,
        )

    def _blocking_client(self) -> Redis:
        """Return the client for blocking reads, apart from the command pool."""
        if self.settings.redis_url.startswith("memory://"):
            return self.client
        if self._reader is None:
            name = f"hivebus:{self.settings.service}:{self.process_id}:reader"
            size = max(4, sum(s.durable for s in self._subscriptions) + 2)
            self._reader = connect(self.settings, client_name=name, pool_size=size)
        return self._reader

    async def _dispatch(self, sub: Subscription, channel: str, body: bytes) -> None:
        """Decode one broadcast message and run ``sub``'s handler on it."""
        try:
            event = codec.decode(
                body, self.types, self.settings.max_event_bytes, raw=sub.raw
            )
        except InvalidEventError as exc:
            logger.error(
                "undecodable broadcast message channel=%s error=%s", channel, exc
            )
            await self.dlq.add(
                channel=channel,
                subscription=BROADCAST_SUBSCRIPTION_PREFIX + sub.group,
                body=body,
                failure=Failure(
                    reason=f"undecodable entry: {exc}", error=exc, attempts=1
                ),
            )
            return
        if sub.types is not None and event.type not in sub.types:
            return
        try:
            async with (
                tracing.handler_span(event, sub),
                metrics.handler_timer(self.client, self.keys, sub.name, event.type),
                asyncio.timeout(sub.handler_timeout),
            ):
                await sub.handler(event)
        except Exception:
            logger.exception(
                "broadcast handler failed channel=%s event_id=%s", channel, event.id
            )

    async def _announce_dead_letter(
        self,
        sub: Subscription,
        event: Event[Any] | None,
        failure: Failure,
        dead_letter_id: str,
    ) -> None:
        """Publish a notice of a dead letter on the errors channel."""
        if sub.channel == ERRORS_CHANNEL:
            return
        data = {
            "dead_letter_id": dead_letter_id,
            "channel": sub.channel,
            "subscription": sub.group,
            "event_id": event.id if event else None,
            "event_type": event.type if event else None,
            "event_source": event.source if event else None,
            "reason": failure.reason,
            "error_type": type(failure.error).__name__ if failure.error else None,
            "error": str(failure.error) if failure.error else None,
            "attempts": failure.attempts,
        }
        await self.publish(
            ERRORS_CHANNEL,
            data,
            type=DEAD_LETTERED_TYPE,
            durable=True,
            raw=True,
            correlation_id=event.correlationid if event else None,
            causation_id=event.id if event else None,
        )

    # -- publishing ------------------------------------------------------

    def event(
        self,
        data: BaseModel | Any,
        *,
        type: str | None = None,
        raw: bool = False,
        subject: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        context_id: str | None = None,
        context_version: int | None = None,
        reply_to: str | None = None,
        traceparent: str | None = None,
        time: datetime | None = None,
    ) -> Event[Any]:
        """Build an event from ``data``, checked against its registered model."""
        event_type = type
        if event_type is None and isinstance(data, BaseModel):
            event_type = self.types.type_of(data.__class__)
        if event_type is None:
            msg = (
                f"cannot tell the event type of {data!r}: pass `type=...`, or "
                "register its model with `bus.types.register(TYPE, Model)`"
            )
            raise InvalidEventError(msg)
        payload = self.types.validate(event_type, data, raw=raw)
        extra: dict[str, Any] = {"time": time} if time is not None else {}
        try:
            return Event[Any](
                source=self.settings.service,
                type=event_type,
                data=payload,
                subject=subject,
                correlationid=correlation_id,
                causationid=causation_id,
                contextid=context_id,
                contextversion=context_version,
                replyto=reply_to,
                traceparent=traceparent or tracing.current_traceparent(),
                **extra,
            )
        except ValueError as exc:
            msg = f"invalid event attributes for type {event_type!r}: {exc}"
            raise InvalidEventError(msg) from exc

    async def publish(
        self,
        channel: str,
        data: BaseModel | Event[Any] | Any,
        *,
        durable: bool = False,
        **attributes: Any,
    ) -> PublishResult:
        """Store an event and deliver it on ``channel``; return what it reached.

        ``data`` is a registered model, an ``Event`` built with ``bus.event``,
        or JSON data with ``type=...`` (and ``raw=True`` if the type has no
        registered model). The remaining keyword arguments are those of
        ``bus.event``.
        """
        results = await self.publish_many(
            channel, [data], durable=durable, **attributes
        )
        return results[0]

    async def publish_many(
        self,
        channel: str,
        items: Sequence[BaseModel | Event[Any] | Any],
        *,
        durable: bool = False,
        **attributes: Any,
    ) -> list[PublishResult]:
        """Publish several events on one channel in one round trip."""
        check_channel(channel)
        publisher = self._publisher
        if publisher is None:
            await self.connect()
            publisher = self._publisher
        assert publisher is not None
        loop = asyncio.get_running_loop()
        outgoing, event_types = [], []
        for item in items:
            event = item if isinstance(item, Event) else self.event(item, **attributes)
            event_types.append(event.type)
            body = codec.encode(event, self.settings.max_event_bytes)
            outgoing.append(
                Outgoing(event.id, channel, body, durable, loop.create_future())
            )
        results = await publisher.send(outgoing)
        metrics.published(self.client, self.keys, event_types)
        return results

    async def get_event(self, event_id: str) -> Event[Any]:
        """Return a stored event by id, with its data as plain JSON values."""
        await self.connect()
        try:
            body = await self.client.get(self.keys.event(event_id))
        except TRANSIENT_ERRORS as exc:
            raise translate(exc, f"fetching event {event_id!r}") from exc
        if body is None:
            msg = (
                f"no stored event {event_id!r}: it never existed, its TTL of "
                f"{self.settings.event_ttl:.0f}s passed, or Redis evicted it"
            )
            raise EventNotFoundError(msg)
        return codec.decode_envelope(body, self.settings.max_event_bytes)

    # -- request and response --------------------------------------------

    @property
    def requester(self) -> Requester:
        """This process's requests: ``pending``, ``late_replies``, ``timeouts``."""
        return self._requester

    @property
    def responders(self) -> Responders:
        """This bus's responders and their ``stats``."""
        return self._responders

    async def request(
        self,
        service: str,
        type: str,
        data: BaseModel | Any,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        context: ContextRef | None = None,
        response_model: type[BaseModel] | None = None,
        raw: bool = False,
    ) -> Any:
        """Send a request to ``service`` and return its response payload.

        See ``Requester.request`` for the arguments and errors.
        """
        return await self._requester.request(
            service,
            type,
            data,
            timeout=timeout,
            context=context,
            response_model=response_model,
            raw=raw,
        )

    def responder(self, type: str, **options: Any) -> Callable[[HandlerT], HandlerT]:
        """Register an async function that responds to requests of ``type``.

        See ``Responders.register`` for the options.
        """
        return self._responders.register(type, **options)

    # -- breakers and health ---------------------------------------------

    def breaker(self, name: str, config: BreakerConfig | None = None) -> CircuitBreaker:
        """Return the shared circuit breaker ``name``, creating it on first use."""
        known = self._breakers.get(name)
        if known is not None:
            return known
        breaker = CircuitBreaker(
            name, self.client, self.keys, self.scripts, config, self._breaker_changed
        )
        self._breakers[name] = breaker
        return breaker

    async def _breaker_changed(self, name: str, before: State, after: State) -> None:
        await self.publish(
            BREAKER_CHANNEL,
            {"breaker": name, "before": before, "after": after},
            type=BREAKER_CHANGED_TYPE,
            raw=True,
        )

    def health(self) -> dict[str, Any]:
        """Return ``status`` (healthy, degraded or starting) and each part's state."""
        parts = {c.sub.name: c.health for c in self._consumers}
        if self._listener is not None:
            parts["broadcast"] = self._listener.health
        if self._publisher is not None:
            parts["publisher"] = self._publisher.health
        states = set(parts.values())
        status = "degraded" if states & {"degraded", "failed"} else "healthy"
        if not self._started:
            status = "stopped"
        elif "starting" in states:
            status = "starting"
        return {"status": status, "parts": parts}

    @property
    def consumers(self) -> list[DurableConsumer]:
        """The running durable consumers, one per durable subscription."""
        return list(self._consumers)

    @property
    def unobserved(self) -> int:
        """Events this process published that reached no listener or group."""
        current = self._publisher.unobserved_total if self._publisher else 0
        return self._unobserved_earlier + current
