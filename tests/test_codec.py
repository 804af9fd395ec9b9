"""Decoding event JSON: the one-pass path for registered types and its fallbacks."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from hivebus import codec
from hivebus.errors import MalformedEventError, SchemaError, UnknownEventTypeError
from hivebus.events import Event, EventTypes

LIMIT = 1024 * 1024


class Order(BaseModel):
    order_id: str
    total: float


class Stamp(BaseModel):
    model_config = ConfigDict(strict=True)

    at: datetime


def registry() -> EventTypes:
    types = EventTypes()
    types.register("order.placed", Order)
    types.register("stamp", Stamp)
    return types


def envelope(**members: Any) -> bytes:
    fields = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "svc",
        "type": "order.placed",
        "time": "2026-01-02T03:04:05Z",
        "data": {"order_id": "o-1", "total": 2.5},
    }
    fields.update(members)
    return json.dumps(fields).encode()


def test_decode_validates_registered_data() -> None:
    event = codec.decode(envelope(), registry(), LIMIT, raw=False)
    assert isinstance(event, Event)
    assert event.data == Order(order_id="o-1", total=2.5)
    assert event.id == "e-1"


def test_decode_matches_encode_round_trip() -> None:
    types = registry()
    sent = Event[Any](
        source="svc", type="order.placed", data=Order(order_id="a", total=1)
    )
    received = codec.decode(codec.encode(sent, LIMIT), types, LIMIT, raw=False)
    assert received.model_dump() == sent.model_dump()


def test_type_inside_data_first() -> None:
    # A "type" member inside data comes before the envelope's own here.
    body = (
        b'{"data":{"type":"stamp","order_id":"o-1","total":1},"specversion":"1.0",'
        b'"id":"e-2","source":"svc","type":"order.placed"}'
    )
    event = codec.decode(body, registry(), LIMIT, raw=True)
    assert event.type == "order.placed"
    assert isinstance(event.data, Order)


def test_decode_reports_schema_violation() -> None:
    body = envelope(data={"order_id": "o-1"})
    with pytest.raises(SchemaError, match="fails Order"):
        codec.decode(body, registry(), LIMIT, raw=False)


def test_decode_reports_unknown_type() -> None:
    with pytest.raises(UnknownEventTypeError, match="'nope'"):
        codec.decode(envelope(type="nope"), registry(), LIMIT, raw=False)


def test_decode_keeps_raw_unknown_data() -> None:
    event = codec.decode(envelope(type="nope"), registry(), LIMIT, raw=True)
    assert event.data == {"order_id": "o-1", "total": 2.5}


def test_decode_rejects_bad_envelope() -> None:
    with pytest.raises(MalformedEventError):
        codec.decode(envelope(specversion="0.3"), registry(), LIMIT, raw=False)


def test_strict_model_reads_json_datetime() -> None:
    # JSON has no datetime type: a strict model still reads the ISO string.
    body = envelope(type="stamp", data={"at": "2026-01-02T03:04:05Z"})
    event = codec.decode(body, registry(), LIMIT, raw=False)
    assert event.data.at.year == 2026
