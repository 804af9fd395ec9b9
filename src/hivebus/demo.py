"""A short tour of the bus: publish, durable delivery, retry, dead letter, replay."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from hivebus.bus import Bus
from hivebus.events import Event
from hivebus.retry import RetryPolicy
from hivebus.subscription import Delivery


class OrderPlaced(BaseModel):
    """An order that a shop service placed."""

    order_id: str
    total: float


async def tour(url: str, console: Console) -> dict[str, Any]:
    """Run the tour on ``url`` and return what happened, for the summary."""
    bus = Bus(url, prefix="hivebus-demo", service="billing")
    bus.types.register("order.placed", OrderPlaced)
    handled: list[tuple[str, int]] = []
    statuses: list[str] = []
    broken = {"o-3"}
    everything_done = asyncio.Event()

    @bus.subscribe(
        "orders", durable=True, retry=RetryPolicy(max_attempts=3, base=0.05, cap=0.2)
    )
    async def bill(event: Event[OrderPlaced], delivery: Delivery) -> None:
        order = event.data
        if order.order_id in broken:
            msg = f"payment provider rejected order {order.order_id}"
            raise RuntimeError(msg)
        if order.order_id == "o-2" and delivery.attempt == 1:
            msg = "payment provider timed out"
            raise TimeoutError(msg)
        handled.append((order.order_id, delivery.attempt))
        await bus.publish(
            "status.billing", {"billed": order.order_id}, type="billed", raw=True
        )
        if len(handled) == 3:
            everything_done.set()

    @bus.subscribe("status.*", raw=True)
    async def watch(event: Event[Any]) -> None:
        statuses.append(f"{event.type} {event.data}")

    async with bus:
        console.print(
            "[bold]1.[/bold] publishing three orders on the durable channel 'orders'"
        )
        for number, total in ((1, 9.5), (2, 20.0), (3, 7.25)):
            result = await bus.publish(
                "orders", OrderPlaced(order_id=f"o-{number}", total=total), durable=True
            )
            console.print(
                f"   stored {result.event_id}, reached {result.groups} group(s)"
            )
        dead = await _wait_for_dead_letter(bus)
        console.print(
            f"[bold]2.[/bold] o-3 failed 3 times and was dead-lettered: {dead.id}"
        )
        console.print(f"   reason: {dead.reason}; error: {dead.error}")
        broken.clear()
        await bus.dlq.replay(dead.id)
        console.print(
            "[bold]3.[/bold] the cause was fixed and the dead letter replayed"
        )
        await asyncio.wait_for(everything_done.wait(), timeout=30)
        stored = await bus.get_event(dead.event_id)
    await _cleanup(bus)
    table = Table("order", "handled on attempt")
    for order_id, attempt in handled:
        table.add_row(order_id, str(attempt))
    console.print(table)
    console.print(f"[bold]4.[/bold] stored copy of {stored.id}: {stored.data}")
    return {"handled": handled, "statuses": statuses, "dead_letter": dead.id}


async def _wait_for_dead_letter(bus: Bus) -> Any:
    async with asyncio.timeout(30):
        while True:
            entries = await bus.dlq.entries(channel="orders")
            if entries:
                return entries[0]
            await asyncio.sleep(0.05)


async def _cleanup(bus: Bus) -> None:
    """Delete the tour's keys, after the consumers have stopped."""
    await bus.connect()
    try:
        keys = [key async for key in bus.client.scan_iter(bus.keys.everything)]
        if keys:
            await bus.client.delete(*keys)
    finally:
        await bus.stop()
