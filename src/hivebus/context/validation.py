"""Validation of events that name a context, and the handler guard that applies it.

An event names a context with its ``contextid`` and ``contextversion``
attributes. It is valid when the context exists, the version exists (it is
not newer than the context) and, for an event that updates the context, its
type is one the context accepts. The guard runs these checks before a
handler::

    @bus.subscribe("stories", durable=True)
    @contexts.validated()
    async def on_story(event: Event[Story], context: Context | None) -> None: ...

An invalid event is not handled: the guard adds it to the dead-letter queue
with the reason, publishes a ``rejected`` context status and returns, and
then the consumer acks the entry. The dead letter is written before the ack,
so a crash between the two can record the same event twice but cannot lose
it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from hivebus.context.models import CONTEXT_CHANNEL, Context, ContextStatus
from hivebus.dlq import BROADCAST_SUBSCRIPTION_PREFIX, Failure
from hivebus.errors import ConfigError, ContextNotFoundError, ContextValidationError
from hivebus.events import Event
from hivebus.subscription import Delivery

if TYPE_CHECKING:
    from hivebus.context.cache import ContextCache
    from hivebus.context.manager import ContextManager

logger = logging.getLogger(__name__)

ContextHandler = Callable[[Event[Any], Context | None], Awaitable[Any]]
GuardedHandler = Callable[[Event[Any], Delivery | None], Awaitable[None]]


def check_event(event: Event[Any], context: Context, *, updates: bool = True) -> None:
    """Raise ``ContextValidationError`` if ``event`` may not use ``context``."""
    named = event.contextversion or 0
    if named > context.version:
        msg = (
            f"event {event.id!r} names version {named} of context {context.id!r}, "
            f"which is at version {context.version}"
        )
        raise ContextValidationError(msg)
    allowed = context.event_types
    if updates and allowed is not None and event.type not in allowed:
        msg = (
            f"event type {event.type!r} may not update context {context.id!r}; "
            f"it accepts {list(allowed)!r}"
        )
        raise ContextValidationError(msg)


async def load_context(
    manager: ContextManager,
    event: Event[Any],
    *,
    cache: ContextCache | None = None,
    updates: bool = True,
) -> Context | None:
    """Return the context ``event`` names, at its version or newer, once valid.

    Returns None for an event that names no context.

    Raises:
        ContextNotFoundError: the context does not exist.
        ContextValidationError: the event fails a check of ``check_event``,
            or names only one of ``contextid`` and ``contextversion``.
    """
    if event.contextid is None and event.contextversion is None:
        return None
    if event.contextid is None or event.contextversion is None:
        msg = (
            f"event {event.id!r} has contextid={event.contextid!r} and "
            f"contextversion={event.contextversion!r}; an event names a context "
            "with both attributes or neither"
        )
        raise ContextValidationError(msg)
    if cache is not None:
        context = await cache.get(event.contextid, min_version=event.contextversion)
    else:
        context = await manager.get(event.contextid)
    check_event(event, context, updates=updates)
    return context


def validated(
    manager: ContextManager,
    *,
    cache: ContextCache | None = None,
    updates: bool = True,
    channel: str | None = None,
) -> Callable[[ContextHandler], GuardedHandler]:
    """Return a decorator that validates each event's context before the handler.

    The handler is called as ``handler(event, context)``, with the context
    at the event's version or newer, or None if the event names no context.

    Args:
        cache: read contexts through this cache instead of from Redis.
        updates: the handler updates the context, so the event's type must
            be one the context accepts.
        channel: the channel whose dead-letter queue takes rejected
            broadcast events; durable deliveries use their own channel.
    """

    def decorate(handler: ContextHandler) -> GuardedHandler:
        if not asyncio.iscoroutinefunction(handler):
            msg = f"handler {handler!r} must be an async function (async def)"
            raise ConfigError(msg)

        async def guarded(event: Event[Any], delivery: Delivery | None = None) -> None:
            try:
                context = await load_context(
                    manager, event, cache=cache, updates=updates
                )
            except (ContextNotFoundError, ContextValidationError) as exc:
                await reject(manager, event, exc, delivery=delivery, channel=channel)
                return
            await handler(event, context)

        guarded.__name__ = getattr(handler, "__name__", "guarded")
        guarded.__qualname__ = getattr(handler, "__qualname__", guarded.__name__)
        return guarded

    return decorate


async def reject(
    manager: ContextManager,
    event: Event[Any],
    error: Exception,
    *,
    delivery: Delivery | None = None,
    channel: str | None = None,
) -> str:
    """Dead-letter ``event`` with ``error`` as the reason; return the dead letter id."""
    bus = manager.bus
    if delivery is not None:
        channel, _, subscription = delivery.subscription.rpartition("/")
    else:
        channel = channel or CONTEXT_CHANNEL
        subscription = BROADCAST_SUBSCRIPTION_PREFIX + bus.settings.service
    dead_letter_id = await bus.dlq.add(
        channel=channel,
        subscription=subscription,
        body=event.model_dump_json(exclude_none=True),
        failure=Failure(
            reason=f"context validation failed: {error}",
            error=error,
            attempts=delivery.attempt if delivery is not None else 1,
        ),
        event=event.model_dump(mode="json"),
    )
    manager.metrics.count("validation_failures")
    manager.metrics.count("rejected_events")
    logger.warning(
        "event rejected by context validation event_id=%s context_id=%s "
        "context_version=%s dead_letter_id=%s reason=%s",
        event.id,
        event.contextid,
        event.contextversion,
        dead_letter_id,
        error,
    )
    status = ContextStatus(
        context_id=event.contextid or "",
        status="rejected",
        version=event.contextversion or 0,
        service=bus.settings.service,
        reason=str(error),
        event_id=event.id,
        event_type=event.type,
    )
    await manager.publish_status(status)
    return dead_letter_id
