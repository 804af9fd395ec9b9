"""Request and response: ``bus.request`` and ``@bus.responder``.

A request is an event on the target service's durable request channel,
``rpc.SERVICE``, read by that service's consumer group. Besides the payload
it carries its correlation id (the request's own event id), the reply
address, the caller's context id and version, and a deadline in epoch
milliseconds on the Redis server's clock. Each process measures its offset
from the server's ``TIME`` at start and every five minutes, so hosts whose
clocks disagree still agree on the deadline.

Replies come back on Pub/Sub. Each process has one reply channel,
``P:reply:PROCESS``, subscribed once by a listener task that routes each
reply to the waiting call by correlation id. A call removes its pending
entry in ``finally``, whatever ends it: the reply, the deadline or a
cancellation. A reply with no pending call (it came after the caller gave
up) is dropped and counted in ``Requester.late_replies``. A reply published
while the listener is reconnecting is lost, and its call times out.

The responder skips a request that is past its deadline when it reaches
the front of the queue, and by default cancels a handler that is still
running at the deadline. A handler's exception goes back to the caller as
``RemoteError``. Replies are stored by id, like every event, and written in
batches by ``ReplyWriter``.

Both ends live in this one module, past the usual 400 lines, because they
share the wire format: the request channel, the reply types and the
deadline rule.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from hivebus import codec
from hivebus.config import redact_url
from hivebus.connection import TRANSIENT_ERRORS, Backoff, Redis
from hivebus.errors import (
    ConfigError,
    DeadLetter,
    InvalidEventError,
    RedisUnavailableError,
    RemoteError,
    RequestTimeoutError,
    SchemaError,
)
from hivebus.events import TYPE_PATTERN, Event
from hivebus.keys import check_name
from hivebus.retry import RetryPolicy

if TYPE_CHECKING:
    from hivebus.bus import Bus
    from hivebus.context.cache import ContextCache
    from hivebus.context.models import Context

logger = logging.getLogger(__name__)

ResponderT = TypeVar("ResponderT", bound=Callable[..., Awaitable[Any]])

AnyEvent = Event[Any]  # parametrised once: each ``Event[Any]`` costs a lookup
REQUEST_CHANNEL_PREFIX = "rpc."
REPLY_TYPE = "hivebus.reply"  # a reply whose payload has no registered type
EMPTY_REPLY_TYPE = "hivebus.reply.none"  # the responder returned None
ERROR_REPLY_TYPE = "hivebus.reply.error"  # the responder raised
READ_TIMEOUT = 1.0  # seconds one Pub/Sub read waits before checking for a stop
CLOCK_REFRESH = 300.0  # seconds between measurements of the server clock offset
DEFAULT_TIMEOUT = 10.0
DEFAULT_CONCURRENCY = 64
MAX_REPLY_BATCH = 256  # replies written in one round trip at most
MALFORMED_LOG_EVERY = 1000  # one log line per this many malformed replies
# A responder's handler is never retried after it raised (the error is the
# reply), but a request held by a responder that died is claimed by a live
# one, and re-run if its deadline has not passed.
RESPONDER_RETRY = RetryPolicy(max_attempts=3, base=0.05, cap=0.5)


def request_channel(service: str) -> str:
    """Return the durable channel on which ``service`` receives requests."""
    return REQUEST_CHANNEL_PREFIX + check_name("service", service)


class ContextRef(Protocol):
    """Anything that names a context version, such as a ``Context``."""

    @property
    def id(self) -> str: ...

    @property
    def version(self) -> int: ...


class ServerClock:
    """This host's estimate of the Redis server's clock, in epoch milliseconds."""

    def __init__(self) -> None:
        self.offset_ms = 0.0
        self.measured_at: float | None = None

    @property
    def stale(self) -> bool:
        """Whether the offset was never measured or is older than the refresh."""
        return (
            self.measured_at is None
            or time.monotonic() - self.measured_at > CLOCK_REFRESH
        )

    async def measure(self, client: Redis) -> None:
        """Measure the offset with ``TIME``, taking the midpoint of the round trip."""
        before = time.time()
        seconds, micros = await client.time()
        after = time.time()
        server_ms = int(seconds) * 1000 + int(micros) / 1000
        self.offset_ms = server_ms - (before + after) * 500
        self.measured_at = time.monotonic()

    def now_ms(self) -> float:
        """Return the estimated server time."""
        return time.time() * 1000 + self.offset_ms


# -- requester ---------------------------------------------------------------


class Requester:
    """Send requests from one process and route their replies back."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._pending: dict[str, asyncio.Future[Event[Any]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self.clock = ServerClock()
        self.sent = 0
        self.timeouts = 0
        self.late_replies = 0
        self.malformed_replies = 0

    @property
    def channel(self) -> str:
        """The Pub/Sub channel on which this process receives replies."""
        return self._bus.keys.reply(self._bus.process_id)

    @property
    def pending(self) -> int:
        """Requests waiting for a reply now."""
        return len(self._pending)

    async def request(
        self,
        service: str,
        type: str,
        data: Any,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        context: ContextRef | None = None,
        response_model: type[BaseModel] | None = None,
        raw: bool = False,
    ) -> Any:
        """Send a request to ``service`` and return the response payload.

        Args:
            timeout: seconds until the deadline, for sending and the reply;
                the responder drops the request once the deadline passes.
            context: the context the request is made in; the responder gets
                that version of it or a newer one.
            response_model: validate the response into this model. Otherwise
                a response of a type registered on this bus becomes its model
                and any other response stays plain JSON.
            raw: send ``data`` as plain JSON when ``type`` has no registered
                model.

        Raises:
            RequestTimeoutError: no reply came before the deadline.
            RedisUnavailableError: the deadline passed before the request
                reached Redis.
            RemoteError: the responder raised; the error names its type.
        """
        if timeout <= 0:
            msg = f"`timeout` must be above 0 seconds, got {timeout!r}"
            raise ConfigError(msg)
        channel = request_channel(service)
        event = self._bus.event(
            data,
            type=type,
            raw=raw,
            reply_to=self.channel,
            context_id=context.id if context is not None else None,
            context_version=context.version if context is not None else None,
        )
        reply = await self._send_and_wait(service, channel, event, timeout)
        return self._unpack(service, reply, response_model)

    async def _send_and_wait(
        self, service: str, channel: str, event: Event[Any], timeout: float
    ) -> Event[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Event[Any]] = loop.create_future()
        correlation_id = event.id  # unique already, so no second id is made
        self._pending[correlation_id] = future
        published = False
        try:
            async with asyncio.timeout(timeout):
                await self._bus.connect()
                await self._listening()
                deadline = int(self.clock.now_ms() + timeout * 1000)
                update = {"correlationid": correlation_id, "deadline": deadline}
                event = event.model_copy(update=update)
                await self._bus.publish(channel, event, durable=True)
                published = True
                self.sent += 1
                return await future
        except TimeoutError:
            self.timeouts += 1
            if not published:
                raise self._unsent_error(service, event, timeout) from None
            msg = (
                f"request {event.type!r} to service {service!r} timed out: no reply "
                f"within its {timeout:g}s deadline (request id {event.id}); check "
                f"that a responder for {service!r} runs, or raise `timeout`"
            )
            raise RequestTimeoutError(msg) from None
        finally:
            del self._pending[correlation_id]

    def _unsent_error(
        self, service: str, event: Event[Any], timeout: float
    ) -> RedisUnavailableError:
        """Describe a request whose deadline passed before it reached Redis."""
        url = redact_url(self._bus.settings.redis_url)
        msg = (
            f"request {event.type!r} to service {service!r} was never sent: Redis "
            f"at {url} stayed unreachable for its whole {timeout:g}s deadline "
            f"(request id {event.id}); check that the server is up and the URL "
            "is right"
        )
        return RedisUnavailableError(msg)

    def _unpack(
        self,
        service: str,
        reply: Event[Any],
        response_model: type[BaseModel] | None,
    ) -> Any:
        if reply.type == ERROR_REPLY_TYPE:
            error = reply.data if isinstance(reply.data, dict) else {}
            raise RemoteError(
                service,
                str(error.get("error_type", "Error")),
                str(error.get("message", reply.data)),
            )
        if reply.type == EMPTY_REPLY_TYPE:
            return None
        if response_model is not None:
            try:
                return response_model.model_validate(reply.data)
            except ValidationError as exc:
                msg = (
                    f"response of service {service!r} fails "
                    f"{response_model.__qualname__}: {exc}"
                )
                raise SchemaError(msg) from exc
        return self._bus.types.validate(reply.type, reply.data, raw=True)

    # -- the reply listener ----------------------------------------------

    async def _listening(self) -> None:
        """Start the reply listener if needed and wait until it is subscribed."""
        if self._listener is None or self._listener.done():
            self._ready = asyncio.Event()
            self._listener = asyncio.create_task(
                self._listen(self._ready), name="hivebus-replies"
            )
            self._listener.add_done_callback(_log_failure)
        assert self._ready is not None
        await self._ready.wait()

    async def _listen(self, ready: asyncio.Event) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        while True:
            pubsub = self._bus.client.pubsub()
            delay = 0.0
            try:
                await pubsub.subscribe(self.channel)
                await self.clock.measure(self._bus.client)
                ready.set()
                backoff.reset()
                logger.debug("reply listener subscribed channel=%s", self.channel)
                await self._read(pubsub)
            except TRANSIENT_ERRORS as exc:
                ready.clear()
                delay = backoff.next_delay()
                logger.error(
                    "reply listener lost its connection, reconnecting channel=%s "
                    "attempt=%d delay=%.2fs error=%s",
                    self.channel,
                    backoff.attempt,
                    delay,
                    exc,
                )
            finally:
                await asyncio.shield(_close(pubsub))
            await asyncio.sleep(delay)  # reached only after a connection error

    async def _read(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=READ_TIMEOUT
            )
            if message is not None and message.get("type") == "message":
                self._route(message["data"])

    def _route(self, body: bytes) -> None:
        try:
            reply = codec.decode_envelope(body, self._bus.settings.max_event_bytes)
        except InvalidEventError as exc:
            self.malformed_replies += 1
            if self.malformed_replies % MALFORMED_LOG_EVERY == 1:
                logger.warning(
                    "malformed reply dropped channel=%s dropped=%d error=%s",
                    self.channel,
                    self.malformed_replies,
                    exc,
                )
            return
        future = self._pending.get(reply.correlationid or "")
        if future is None or future.done():
            self.late_replies += 1
            logger.debug(
                "late reply dropped correlation_id=%s event_id=%s",
                reply.correlationid,
                reply.id,
            )
            return
        future.set_result(reply)

    async def close(self) -> None:
        """Stop the reply listener and unsubscribe; waiting calls time out."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def _close(pubsub: Any) -> None:
    try:
        await pubsub.aclose()
    except TRANSIENT_ERRORS:
        pass


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("reply listener failed", exc_info=task.exception())


# -- responders --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Responder:
    handler: Callable[..., Awaitable[Any]]
    contexts: ContextCache | None
    wants_context: bool
    cancel_at_deadline: bool


@dataclass(slots=True)
class ResponderStats:
    """Counters of one process's responders since it started."""

    handled: int = 0
    failed: int = 0
    expired: int = 0
    cancelled: int = 0


@dataclass(slots=True)
class Responders:
    """The responders of one bus, served from its service's request channel."""

    bus: Bus
    concurrency: int | None = None
    stats: ResponderStats = field(default_factory=ResponderStats)
    clock: ServerClock = field(default_factory=ServerClock)
    _handlers: dict[str, _Responder] = field(default_factory=dict)
    _subscribed: bool = False
    _writer: ReplyWriter = field(init=False)

    def __post_init__(self) -> None:
        self._writer = ReplyWriter(self.bus)

    def register(
        self,
        type: str,
        *,
        contexts: ContextCache | None = None,
        cancel_at_deadline: bool = True,
        concurrency: int | None = None,
    ) -> Callable[[ResponderT], ResponderT]:
        """Return a decorator that makes an async function respond to ``type``.

        The function takes the request event, and the request's context as a
        second argument if it declares one, and returns the response: a
        model, JSON data or None.

        Args:
            contexts: the cache that provides the request's context, at the
                version the request names or newer.
            cancel_at_deadline: cancel the handler when the request's
                deadline passes, since the caller has given up by then.
            concurrency: requests handled at once by this process, for all
                request types of the service (64 by default); set it once.
        """
        self._check(type, concurrency)

        def decorate(handler: ResponderT) -> ResponderT:
            function: Any = handler
            if not inspect.iscoroutinefunction(function):
                msg = f"responder {handler!r} must be an async function (async def)"
                raise ConfigError(msg)
            wants_context = _positional_count(handler) >= 2
            if wants_context and contexts is None:
                msg = (
                    f"responder {handler.__qualname__} takes a context argument; "
                    "pass `contexts=ContextCache(manager)` to `bus.responder`"
                )
                raise ConfigError(msg)
            self._handlers[type] = _Responder(
                handler, contexts, wants_context, cancel_at_deadline
            )
            self._subscribe()
            return handler

        return decorate

    def _check(self, type: str, concurrency: int | None) -> None:
        if not re.match(TYPE_PATTERN, type):
            msg = f"invalid request type {type!r}: use an event type such as 'user.get'"
            raise ConfigError(msg)
        if type in self._handlers:
            msg = f"request type {type!r} already has a responder on this bus"
            raise ConfigError(msg)
        if concurrency is None:
            return
        if concurrency < 1 or (self.concurrency not in (None, concurrency)):
            msg = (
                f"responder `concurrency` {concurrency!r} must be at least 1 and "
                f"the same for every responder of the bus (already {self.concurrency})"
            )
            raise ConfigError(msg)
        self.concurrency = concurrency

    def _subscribe(self) -> None:
        if self._subscribed:
            return
        self._subscribed = True
        self.bus.subscribe(
            request_channel(self.bus.settings.service),
            durable=True,
            raw=True,
            concurrency=self.concurrency or DEFAULT_CONCURRENCY,
            retry=RESPONDER_RETRY,
        )(self.handle)

    async def handle(self, request: Event[Any]) -> None:
        """Handle one request; the durable consumer calls this for each entry."""
        reply_to = self._reply_address(request)
        remaining = await self._remaining(request)
        if remaining is not None and remaining <= 0:
            self.stats.expired += 1
            logger.debug(
                "request past its deadline dropped event_id=%s type=%s late_ms=%d",
                request.id,
                request.type,
                -remaining,
            )
            return
        responder = self._handlers.get(request.type)
        if responder is None:
            error = LookupError(
                f"service {self.bus.settings.service!r} has no responder for request "
                f"type {request.type!r}; it answers {sorted(self._handlers)!r}"
            )
            await self._reply(request, reply_to, error=error)
            return
        limit = None
        if remaining is not None and responder.cancel_at_deadline:
            limit = remaining / 1000
        await self._run(request, reply_to, responder, limit)

    async def _run(
        self,
        request: Event[Any],
        reply_to: str,
        responder: _Responder,
        limit: float | None,
    ) -> None:
        try:
            async with asyncio.timeout(limit) as scope:
                result = await self._call(request, responder)
        except TimeoutError:
            if not scope.expired():
                raise
            self.stats.cancelled += 1
            logger.info(
                "responder cancelled at the request deadline event_id=%s type=%s",
                request.id,
                request.type,
            )
            return
        except Exception as exc:
            self.stats.failed += 1
            logger.info(
                "responder failed, error sent to the caller event_id=%s type=%s "
                "error=%r",
                request.id,
                request.type,
                exc,
            )
            await self._reply(request, reply_to, error=exc)
            return
        self.stats.handled += 1
        await self._reply(request, reply_to, result=result)

    async def _call(self, request: Event[Any], responder: _Responder) -> Any:
        if not responder.wants_context:
            return await responder.handler(request)
        context: Context | None = None
        if request.contextid is not None and responder.contexts is not None:
            context = await responder.contexts.get(
                request.contextid, min_version=request.contextversion
            )
        return await responder.handler(request, context)

    def _reply_address(self, request: Event[Any]) -> str:
        reply_prefix = self.bus.keys.reply("")
        if request.correlationid is None or request.replyto is None:
            msg = f"request {request.id!r} has no correlationid or replyto"
            raise DeadLetter(msg)
        if not request.replyto.startswith(reply_prefix):
            msg = (
                f"request {request.id!r} names reply address {request.replyto!r}, "
                f"which is not a reply channel ({reply_prefix}PROCESS)"
            )
            raise DeadLetter(msg)
        return request.replyto

    async def _remaining(self, request: Event[Any]) -> float | None:
        """Return the milliseconds left until the request's deadline, or None."""
        if request.deadline is None:
            return None
        if self.clock.stale:
            await self.clock.measure(self.bus.client)
        return request.deadline - self.clock.now_ms()

    async def _reply(
        self,
        request: Event[Any],
        reply_to: str,
        *,
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        """Store the reply by id and publish it to the caller's reply channel."""
        reply = self._reply_event(request, result, error)
        try:
            body = codec.encode(reply, self.bus.settings.max_event_bytes)
        except Exception as exc:  # too large, or not JSON: the caller gets why
            logger.info(
                "response cannot be encoded, error sent instead event_id=%s error=%r",
                request.id,
                exc,
            )
            reply = self._reply_event(request, None, exc)
            body = codec.encode(reply, self.bus.settings.max_event_bytes)
        try:
            await self._writer.send(self.bus.keys.event(reply.id), reply_to, body)
        except TRANSIENT_ERRORS as exc:
            logger.error(
                "reply not sent, the caller will time out event_id=%s reply_to=%s "
                "error=%s",
                request.id,
                reply_to,
                exc,
            )

    async def close(self) -> None:
        """Close the connection that replies are written on."""
        await self._writer.close()

    def _reply_event(
        self, request: Event[Any], result: Any, error: BaseException | None
    ) -> Event[Any]:
        if error is not None:
            reply_type = ERROR_REPLY_TYPE
            data: Any = {"error_type": type(error).__name__, "message": str(error)}
        elif result is None:
            reply_type, data = EMPTY_REPLY_TYPE, {}
        else:
            reply_type, data = self._typed(result)
        return AnyEvent(
            source=self.bus.settings.service,
            type=reply_type,
            data=data,
            correlationid=request.correlationid,
            causationid=request.id,
            contextid=request.contextid,
            contextversion=request.contextversion,
        )

    def _typed(self, result: Any) -> tuple[str, Any]:
        if isinstance(result, BaseModel):
            return self.bus.types.type_of(type(result)) or REPLY_TYPE, result
        return REPLY_TYPE, result


@dataclass(slots=True)
class _OutgoingReply:
    key: str
    channel: str
    body: bytes
    future: asyncio.Future[None]


class ReplyWriter:
    """Write replies on a connection of their own, coalescing concurrent ones.

    A reply sent while no write is in flight goes out at once from the
    handler's task. Replies sent during a write wait, and a writer task sends
    them together in the next one. Each reply is one SET (the stored copy,
    with the event TTL) and one PUBLISH. The commands are packed by hand and
    read on one connection, which skips the CPU that redis-py's pipeline and
    blocking pool spend on every call.
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._queue: list[_OutgoingReply] = []
        self._busy = False
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._connection: Any = None

    async def send(self, key: str, channel: str, body: bytes) -> None:
        """Store ``body`` at ``key`` and publish it on ``channel``."""
        reply = _OutgoingReply(
            key, channel, body, asyncio.get_running_loop().create_future()
        )
        if self._busy or self._queue:
            self._queue.append(reply)
            self._start_writer()
            await reply.future
            return
        await self._flush([reply])
        reply.future.result()

    def _start_writer(self) -> None:
        self._wakeup.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(
                self._write_loop(), name="hivebus-reply-writer"
            )

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and not self._busy:
                batch = self._queue[:MAX_REPLY_BATCH]
                del self._queue[:MAX_REPLY_BATCH]
                await self._flush(batch)

    async def _flush(self, batch: list[_OutgoingReply]) -> None:
        self._busy = True
        try:
            await self._write(batch)
        except Exception as exc:
            for reply in batch:
                if not reply.future.done():
                    reply.future.set_exception(exc)
        finally:
            self._busy = False
            for reply in batch:
                if not reply.future.done():
                    reply.future.cancel()
            if self._queue:
                self._start_writer()

    async def _write(self, batch: list[_OutgoingReply]) -> None:
        ttl_ms = b"%d" % max(1, int(self._bus.settings.event_ttl * 1000))
        connection = self._own_connection()
        commands: list[bytes] = []
        for reply in batch:
            commands.append(
                _resp(b"SET", reply.key.encode(), reply.body, b"PX", ttl_ms)
            )
            commands.append(_resp(b"PUBLISH", reply.channel.encode(), reply.body))
        try:
            async with asyncio.timeout(self._bus.settings.socket_timeout):
                await connection.send_packed_command(commands)
                for _ in commands:
                    await connection.read_response()
        except BaseException:
            # Unread replies would be taken as the replies of the next write.
            await connection.disconnect(nowait=True)
            raise
        for reply in batch:
            if not reply.future.done():
                reply.future.set_result(None)

    def _own_connection(self) -> Any:
        """Return the writer's connection, made with the command pool's settings."""
        if self._connection is None:
            pool = self._bus.client.connection_pool
            options = dict(pool.connection_kwargs)
            if options.get("client_name"):
                options["client_name"] += ":replies"
            self._connection = pool.connection_class(**options)
        return self._connection

    async def close(self) -> None:
        """Stop the writer task and close the connection."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect()


def _resp(*parts: bytes) -> bytes:
    """Encode one command in RESP, the protocol's request format."""
    chunks = [b"*%d\r\n" % len(parts)]
    for part in parts:
        chunks.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(chunks)


def _positional_count(handler: Callable[..., Any]) -> int:
    parameters = inspect.signature(handler).parameters.values()
    return sum(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters
    )
