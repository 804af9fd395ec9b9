"""Stored events by id, and the live feed of every channel as server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.responses import StreamingResponse

from hivebus.web import sse
from hivebus.web.feed import Viewer
from hivebus.web.services import Services, services

router = APIRouter(prefix="/api", tags=["events"])

ServicesDep = Annotated[Services, Depends(services)]


@router.get("/events/{event_id}")
async def get_event(event_id: str, app: ServicesDep) -> dict[str, Any]:
    """Return a stored event (CloudEvents JSON); 404 once its TTL has passed."""
    event = await app.bus.get_event(event_id)
    data: dict[str, Any] = event.model_dump(mode="json", exclude_none=True)
    return data


@router.get(
    "/feed",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def feed(
    app: ServicesDep,
    channel: Annotated[list[str] | None, Query()] = None,
    type: Annotated[list[str] | None, Query()] = None,
) -> StreamingResponse:
    """Stream every event published from now on, as server-sent events.

    ``channel`` and ``type`` filter by name or glob pattern (``team.*``), and
    may repeat. Each message's ``id`` is the event id. The feed is live only:
    a reconnect continues with new events, and events published while the
    client was away can be fetched by id.
    """
    viewer = Viewer(channels=tuple(channel or ()), types=tuple(type or ()))
    return sse.response(_follow(app, viewer))


async def _follow(app: Services, viewer: Viewer) -> AsyncIterator[str]:
    try:
        await app.feed.join(viewer)
        yield sse.message(json.dumps({"filters": _filters(viewer)}), event="ready")
        reported = 0
        while True:
            item = await viewer.queue.get()
            if viewer.dropped > reported:
                lost = viewer.dropped - reported
                reported = viewer.dropped
                yield sse.message(json.dumps({"dropped": lost}), event="dropped")
            yield sse.message(json.dumps(item), event_id=item["id"], event="event")
    finally:
        await app.feed.leave(viewer)


def _filters(viewer: Viewer) -> dict[str, list[str]]:
    return {"channel": list(viewer.channels), "type": list(viewer.types)}
