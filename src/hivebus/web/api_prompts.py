"""Role prompts: the version in use per role, and each role's history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from hivebus.team.prompts import PromptStore
from hivebus.team.work import ROLES
from hivebus.web.services import Services, services

router = APIRouter(prefix="/api/prompts", tags=["prompts"])

ServicesDep = Annotated[Services, Depends(services)]


@router.get("")
async def list_prompts(app: ServicesDep) -> list[dict[str, Any]]:
    """Return each role's prompt in use, its latest version and any pin."""
    store = prompt_store(app)
    listed = []
    for role in ROLES:
        current = await store.current(role)
        listed.append(
            current.model_dump(mode="json")
            | {
                "latest": await store.latest_version(role),
                "pinned": await store.pinned(role),
            }
        )
    return listed


@router.get("/{role}")
async def prompt_history(role: str, app: ServicesDep) -> dict[str, Any]:
    """Return a role's versions, oldest first, each with its reason and diff."""
    store = prompt_store(app)
    history = await store.history(role)
    current = await store.current(role)
    return {
        "role": role,
        "current": current.version,
        "pinned": await store.pinned(role),
        "versions": [version.model_dump(mode="json") for version in history],
    }


def prompt_store(app: Services) -> PromptStore:
    """Return the prompt store on the app's bus."""
    return PromptStore(app.bus.client, app.bus.keys)
