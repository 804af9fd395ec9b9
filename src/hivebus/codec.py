"""JSON encoding and decoding of events, with the size limit (JSON only, no pickle)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from hivebus.errors import EventTooLargeError, MalformedEventError
from hivebus.events import Event, EventTypes


def encode(event: Event[Any], max_bytes: int) -> bytes:
    """Return the structured-mode JSON of ``event``, or raise if it is too large."""
    if event.data is None:
        msg = (
            f"event {event.id!r} of type {event.type!r} has no data; "
            "send an empty object ({}) for an empty payload"
        )
        raise MalformedEventError(msg)
    body = event.model_dump_json(exclude_none=True).encode()
    if len(body) > max_bytes:
        msg = (
            f"event {event.id!r} of type {event.type!r} is {len(body)} bytes, over "
            f"the limit of {max_bytes}; send a smaller payload (store large blobs "
            "elsewhere and send a reference) or raise `max_event_bytes`"
        )
        raise EventTooLargeError(msg)
    return body


def decode_envelope(body: bytes | str, max_bytes: int) -> Event[Any]:
    """Parse an event's JSON envelope, leaving ``data`` as plain JSON values."""
    size = len(body)
    if size > max_bytes:
        msg = f"entry is {size} bytes, over the limit of {max_bytes}"
        raise EventTooLargeError(msg)
    try:
        return Event[Any].model_validate_json(body)
    except ValidationError as exc:
        preview = body[:80]
        msg = f"not a valid CloudEvents JSON envelope ({preview!r}...): {exc}"
        raise MalformedEventError(msg) from exc


# The first "type" member in the body, found without parsing it. Usually the
# envelope's, because hivebus writes envelope members before ``data``.
_TYPE_MEMBER = re.compile(rb'"type"\s*:\s*"([A-Za-z0-9][A-Za-z0-9_.\-]{0,199})"')
_typed_events: dict[type[BaseModel], type[Event[Any]]] = {}


def decode(
    body: bytes | str, types: EventTypes, max_bytes: int, *, raw: bool
) -> Event[Any]:
    """Parse an event and validate its data against the registered model."""
    if len(body) <= max_bytes:
        event = _decode_typed(body.encode() if isinstance(body, str) else body, types)
        if event is not None:
            return event
    envelope = decode_envelope(body, max_bytes)
    data = types.validate(envelope.type, envelope.data, raw=raw)
    if data is envelope.data:
        return envelope
    return envelope.model_copy(update={"data": data})


def _decode_typed(body: bytes, types: EventTypes) -> Event[Any] | None:
    """Parse and validate envelope and data in one pass, or return None.

    This is the fast path for an event of a registered type: it costs about
    half of parsing the envelope and then validating its data. None means
    that the type could not be read cheaply, is not registered, or failed
    validation. The caller then takes the two-step path, which returns the
    same event or raises the precise error.
    """
    match = _TYPE_MEMBER.search(body)
    if match is None:
        return None
    event_type = match.group(1).decode()
    model = types.model_for(event_type)
    if model is None:
        return None
    typed = _typed_events.get(model)
    if typed is None:
        typed = _typed_events[model] = Event[model]  # type: ignore[valid-type]
    try:
        event = typed.model_validate_json(body)
    except ValidationError:
        return None
    # A "type" member inside ``data`` may have come first: then this is
    # another type's event, and the two-step path validates it.
    return event if event.type == event_type else None
