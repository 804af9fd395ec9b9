"""JSON encoding and decoding of events, with the size limit (JSON only, no pickle)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

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


def decode(
    body: bytes | str, types: EventTypes, max_bytes: int, *, raw: bool
) -> Event[Any]:
    """Parse an event and validate its data against the registered model."""
    envelope = decode_envelope(body, max_bytes)
    data = types.validate(envelope.type, envelope.data, raw=raw)
    if data is envelope.data:
        return envelope
    return envelope.model_copy(update={"data": data})
