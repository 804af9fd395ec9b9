"""OpenTelemetry trace context carried from a publisher to its handlers.

Publishing puts the current trace context into the event's ``traceparent``
attribute (W3C Trace Context) through the globally configured propagator.
Handling takes it out again and runs the handler inside a consumer span that
is a child of the publisher's span, so the spans of one task form one trace
across processes.

Only ``opentelemetry-api`` is needed. Without an SDK (no tracer provider
set) every span is a non-recording no-op and no ``traceparent`` is written.
The propagator is the global one, W3C ``tracecontext`` by default. A
propagator set to another format (``OTEL_PROPAGATORS=b3``) writes no
``traceparent``, so events then carry no trace context.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from hivebus.events import Event
    from hivebus.subscription import Subscription

MESSAGING_SYSTEM = "redis"

# A proxy until an SDK sets the tracer provider, then the provider's tracer.
_tracer = trace.get_tracer("hivebus")


def current_traceparent() -> str | None:
    """Return the current span's context as a ``traceparent`` value, or None."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


class handler_span:  # lowercase: used like a function, in `async with`
    """Run a handler inside a consumer span whose parent is the event's publisher.

    The span records an exception that escapes the handler and marks itself
    as failed. An event without ``traceparent`` starts a new trace, or joins
    the trace that is current where the handler runs.
    """

    __slots__ = ("_event", "_scope", "_subscription")

    def __init__(self, event: Event[Any], subscription: Subscription) -> None:
        self._event = event
        self._subscription = subscription
        self._scope: AbstractContextManager[trace.Span] | None = None

    async def __aenter__(self) -> trace.Span:
        event, sub = self._event, self._subscription
        parent = None
        if event.traceparent:
            parent = propagate.extract({"traceparent": event.traceparent})
        attributes: dict[str, str] = {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "process",
            "messaging.destination.name": sub.channel,
            "messaging.consumer.group.name": sub.group,
            "messaging.message.id": event.id,
            "cloudevents.event_type": event.type,
            "cloudevents.event_source": event.source,
        }
        if event.correlationid:
            attributes["messaging.message.conversation_id"] = event.correlationid
        self._scope = _tracer.start_as_current_span(
            f"process {sub.channel}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        return self._scope.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._scope is not None
        self._scope.__exit__(exc_type, exc, traceback)
