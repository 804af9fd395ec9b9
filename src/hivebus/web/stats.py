"""Counters over every process (``/api/stats``) and Prometheus text (``/metrics``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from hivebus import metrics
from hivebus.bus import Bus
from hivebus.web.api_breakers import read_breakers
from hivebus.web.services import Services, services

router = APIRouter(tags=["metrics"])

ServicesDep = Annotated[Services, Depends(services)]


@router.get("/api/stats")
async def shared_stats(app: ServicesDep) -> dict[str, Any]:
    """Return the event counters that every process adds to in Redis."""
    shared = await metrics.read_shared(app.bus.client, app.bus.keys)
    return shared.to_dict()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def prometheus_metrics(app: ServicesDep) -> Response:
    """Return this process's metrics and the shared ones, in Prometheus text."""
    bus = app.bus
    shared = await metrics.read_shared(bus.client, bus.keys)
    breakers = [
        metrics.BreakerReading(b["name"], b["state"], b["failures"])
        for b in await read_breakers(bus)
    ]
    body = metrics.render(shared, breakers, await _context_counts(bus))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def _context_counts(bus: Bus) -> dict[str, int]:
    raw = await bus.client.hgetall(bus.keys.context_metrics)
    counts = {}
    for name, value in raw.items():
        text = name.decode() if isinstance(name, bytes) else str(name)
        counts[text] = int(value)
    return counts
