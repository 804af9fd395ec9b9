"""The benchmark workload on the hivebus side: the payload model and the bus."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from harness import REDIS_URL
from hivebus import Bus, codec

EVENT_TYPE = "bench.order"


class Order(BaseModel):
    """The benchmark payload; its encoded event is about 300 bytes."""

    order_id: str
    customer: str
    sku: str
    quantity: int
    total: float
    note: str


def order(number: int) -> Order:
    """Return the payload of event ``number``."""
    return Order(
        order_id=f"o-{number:010d}",
        customer="c-1234567",
        sku="sku-abcdef",
        quantity=3,
        total=99.5,
        note="n" * 28,
    )


def make_bus(prefix: str, **overrides: Any) -> Bus:
    """Return a bus on the benchmark Redis with the ``Order`` type registered."""
    bus = Bus(REDIS_URL, prefix=prefix, service="bench", **overrides)
    bus.types.register(EVENT_TYPE, Order)
    return bus


def encoded_event(bus: Bus, number: int = 0) -> bytes:
    """Return the JSON body hivebus stores for event ``number``.

    The raw redis-py variants send this same body, so both sides move the
    same bytes.
    """
    return codec.encode(bus.event(order(number)), bus.settings.max_event_bytes)
