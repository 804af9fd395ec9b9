"""Circuit breaker states, as every instance shares them in Redis."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from hivebus.bus import Bus
from hivebus.web.services import Services, services

router = APIRouter(prefix="/api/breakers", tags=["breakers"])

ServicesDep = Annotated[Services, Depends(services)]
SCAN_COUNT = 500  # keys looked at per SCAN call while listing breakers


@router.get("")
async def list_breakers(app: ServicesDep) -> list[dict[str, Any]]:
    """Return every breaker's state, failures and calls in its window."""
    return await read_breakers(app.bus)


async def breaker_names(bus: Bus) -> list[str]:
    """Return the names of every breaker that has state in Redis."""
    names = set()
    async for key in bus.client.scan_iter(match=bus.keys.breakers, count=SCAN_COUNT):
        text = key.decode() if isinstance(key, bytes) else str(key)
        if "{" in text:
            names.add(bus.keys.channel_of(text))
    return sorted(names)


async def read_breakers(bus: Bus) -> list[dict[str, Any]]:
    """Return the state of every breaker as JSON values.

    The window counts assume the default window and bucket count, because
    the dashboard does not know the config each service gave its breaker.
    """
    readings = []
    for name in await breaker_names(bus):
        state = await bus.breaker(name).state()
        readings.append(
            {
                "name": state.name,
                "state": state.state,
                "failures": state.failures,
                "calls": state.calls,
                "opened_at_ms": state.opened_at_ms,
                "changed_at_ms": state.changed_at_ms,
            }
        )
    return readings
