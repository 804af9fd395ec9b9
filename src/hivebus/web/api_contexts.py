"""Contexts: the list, one context with its versions, and diffs between versions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from hivebus.web.services import Services, services

router = APIRouter(prefix="/api/contexts", tags=["contexts"])

ServicesDep = Annotated[Services, Depends(services)]


@router.get("")
async def list_contexts(
    app: ServicesDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 200
) -> list[dict[str, Any]]:
    """Return the contexts' ids, versions, owners and sizes, largest first."""
    manager = app.contexts
    ids = await app.bus.client.zrevrange(app.bus.keys.context_sizes, 0, limit - 1)
    listed = []
    for raw_id in ids:
        context_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        context = await manager.get(context_id)
        listed.append(
            context.model_dump(mode="json", exclude={"data"})
            | {"sections": sorted(context.data)}
        )
    return listed


@router.get("/{context_id}")
async def show_context(
    context_id: str, app: ServicesDep, version: int | None = None
) -> dict[str, Any]:
    """Return the current version of a context, or the version asked for."""
    context = await app.contexts.get(context_id, version)
    return context.model_dump(mode="json")


@router.get("/{context_id}/versions")
async def context_versions(
    context_id: str,
    app: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Return the kept versions of a context, oldest first, with their data."""
    history = await app.contexts.history(context_id, limit=limit)
    return [context.model_dump(mode="json") for context in history]


@router.get("/{context_id}/diff")
async def context_diff(
    context_id: str,
    app: ServicesDep,
    from_version: Annotated[int, Query(alias="from", ge=1)],
    to_version: Annotated[int, Query(alias="to", ge=1)],
) -> dict[str, Any]:
    """Return what changed between two versions (JSON Pointer keys into data)."""
    diff = await app.contexts.diff(context_id, from_version, to_version)
    return diff.model_dump(mode="json")
