"""Server-sent events: message framing, keep-alive comments and the response."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from fastapi import HTTPException
from starlette.responses import StreamingResponse

RETRY_MS = 2000  # how long a browser waits before it reconnects a dropped stream
KEEPALIVE_SECONDS = 15.0  # idle time after which a comment line keeps proxies open
STREAM_ID_RE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each message on at once
}


def message(data: str, *, event_id: str | None = None, event: str | None = None) -> str:
    """Return one SSE message; every message carries the ``retry:`` hint."""
    lines = [f"retry: {RETRY_MS}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return "\n".join(lines) + "\n\n"


def resume_id_value(value: str | None) -> str | None:
    """Return the stream id to resume after, or None to start from the beginning.

    Raises a 400 error naming ``value`` when it is not a stream id.
    """
    if not value:
        return None
    if not STREAM_ID_RE.match(value):
        detail = (
            f"invalid Last-Event-ID or `after` value {value!r}: use the id of a "
            "message received before, such as 1718000000000-0"
        )
        raise HTTPException(status_code=400, detail=detail)
    return value


async def keep_alive(
    source: AsyncIterator[str], interval: float = KEEPALIVE_SECONDS
) -> AsyncIterator[str]:
    """Yield from ``source``, plus a comment line whenever it is idle ``interval``."""
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield ": keep-alive\n\n"
                continue
            finished, pending = pending, None
            try:
                chunk = finished.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()


def response(source: AsyncIterator[str]) -> StreamingResponse:
    """Return a ``text/event-stream`` response that sends ``source``."""
    return StreamingResponse(
        keep_alive(source), media_type="text/event-stream", headers=HEADERS
    )
