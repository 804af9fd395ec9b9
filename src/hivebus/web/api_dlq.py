"""Dead letters: list, show, replay, delete and purge."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from hivebus.dlq import make_id
from hivebus.web.services import Services, services

router = APIRouter(prefix="/api/dlq", tags=["dead letters"])

ServicesDep = Annotated[Services, Depends(services)]


class PurgeRequest(BaseModel):
    """Filters of a purge: none deletes every dead letter, else those matching all."""

    channel: str | None = None
    subscription: str | None = Field(
        default=None, description="a group, or CHANNEL/GROUP for one subscription"
    )
    older_than: float | None = Field(
        default=None, ge=0, description="only entries older than this, in seconds"
    )


@router.get("")
async def list_dead_letters(
    app: ServicesDep,
    channel: str | None = None,
    subscription: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict[str, Any]:
    """Return dead letters, newest first, with the total count."""
    dlq = app.bus.dlq
    entries = await dlq.entries(channel=channel, subscription=subscription, limit=limit)
    return {
        "count": await dlq.count(channel),
        "entries": [entry.to_dict() for entry in entries],
    }


@router.get("/{channel}/{entry_id}")
async def show_dead_letter(
    channel: str, entry_id: str, app: ServicesDep
) -> dict[str, Any]:
    """Return one dead letter with its event, error and traceback."""
    entry = await app.bus.dlq.get(make_id(channel, entry_id))
    return entry.to_dict()


@router.post("/{channel}/{entry_id}/replay")
async def replay_dead_letter(
    channel: str, entry_id: str, app: ServicesDep
) -> dict[str, Any]:
    """Deliver a dead letter to its subscription again, attempts reset."""
    entry = await app.bus.dlq.replay(make_id(channel, entry_id))
    return {"replayed": entry.id, "event_id": entry.event_id}


@router.delete("/{channel}/{entry_id}")
async def delete_dead_letter(
    channel: str, entry_id: str, app: ServicesDep
) -> dict[str, int]:
    """Delete one dead letter without replaying it."""
    removed = await app.bus.dlq.remove([make_id(channel, entry_id)])
    return {"removed": removed}


@router.post("/purge")
async def purge_dead_letters(request: PurgeRequest, app: ServicesDep) -> dict[str, int]:
    """Delete dead letters: all, or those of a channel, subscription or age."""
    removed = await app.bus.dlq.purge(
        older_than=request.older_than,
        channel=request.channel,
        subscription=request.subscription,
    )
    return {"purged": removed}
