"""Event ids: ULIDs that python-ulid reads back with the right timestamp."""

from __future__ import annotations

import time

from ulid import ULID

from hivebus.events import new_event_id


def test_event_id_parses_as_ulid() -> None:
    before_ms = time.time_ns() // 1_000_000
    event_id = new_event_id()
    after_ms = time.time_ns() // 1_000_000
    parsed = ULID.from_str(event_id)
    assert str(parsed) == event_id
    assert before_ms <= parsed.milliseconds <= after_ms


def test_event_ids_are_unique() -> None:
    ids = [new_event_id() for _ in range(10_000)]
    assert len(set(ids)) == 10_000


def test_event_ids_sort_across_ms() -> None:
    first = new_event_id()
    start = time.monotonic()
    while time.time_ns() // 1_000_000 <= ULID.from_str(first).milliseconds:
        assert time.monotonic() - start < 1, "the clock did not move for 1 s"
    assert new_event_id() > first
