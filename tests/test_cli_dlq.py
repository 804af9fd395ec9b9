"""The dlq commands: list, show, replay and purge, against a real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from hivebus import Bus, Delivery, Event, RetryPolicy
from hivebus.cli import app
from hivebus.dlq import Failure
from tests.conftest import REDIS_URL, delete_prefix, eventually, new_prefix

runner = CliRunner()


@pytest.fixture
def cli_prefix() -> Iterator[str]:
    prefix = new_prefix()
    yield prefix
    asyncio.run(with_bus(prefix, lambda bus: delete_prefix(bus.client, prefix)))


async def with_bus(prefix: str, action: Any) -> Any:
    bus = Bus(REDIS_URL, prefix=prefix, service="svc")
    await bus.connect()
    try:
        return await action(bus)
    finally:
        await bus.stop()


def invoke(prefix: str, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [*args, "--redis", REDIS_URL, "--prefix", prefix])
    return result.exit_code, result.stdout, result.stderr


def seed(prefix: str, names: list[str], group: str = "billing") -> list[str]:
    """Store one dead letter per name on channel ``jobs``; return their ids."""

    async def add(bus: Bus) -> list[str]:
        ids = []
        for name in names:
            event = bus.event({"name": name}, type="job", raw=True)
            ids.append(
                await bus.dlq.add(
                    channel="jobs",
                    subscription=group,
                    body=event.model_dump_json(),
                    failure=Failure("gave up", KeyError(name), 2),
                    event=event.model_dump(mode="json"),
                )
            )
        return ids

    result: list[str] = asyncio.run(with_bus(prefix, add))
    return result


def redo_length(prefix: str, group: str) -> int:
    async def length(bus: Bus) -> int:
        return int(await bus.client.xlen(bus.keys.redo("jobs", group)))

    result: int = asyncio.run(with_bus(prefix, length))
    return result


# -- list and show -------------------------------------------------------------


def test_list_json_newest_first(cli_prefix: str) -> None:
    ids = seed(cli_prefix, ["a", "b"])
    code, out, _ = invoke(cli_prefix, "dlq", "list", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [row["id"] for row in rows] == ids[::-1]
    assert rows[0]["event"]["data"] == {"name": "b"}
    assert rows[0]["error_type"] == "KeyError"
    assert rows[0]["attempts"] == 2


def test_list_filters_by_subscription(cli_prefix: str) -> None:
    (billing,) = seed(cli_prefix, ["a"], group="billing")
    seed(cli_prefix, ["b"], group="shipping")
    code, out, _ = invoke(
        cli_prefix, "dlq", "list", "--subscription", "jobs/billing", "--json"
    )
    assert code == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == [billing]


def test_list_table_names_entries(cli_prefix: str) -> None:
    (dead_letter_id,) = seed(cli_prefix, ["a"])
    code, out, _ = invoke(cli_prefix, "dlq", "list")
    assert code == 0
    assert dead_letter_id in out
    assert "jobs/billing" in out


def test_list_empty_says_so(cli_prefix: str) -> None:
    code, out, _ = invoke(cli_prefix, "dlq", "list")
    assert code == 0
    assert "no dead letters" in out


def test_show_prints_error_and_event(cli_prefix: str) -> None:
    (dead_letter_id,) = seed(cli_prefix, ["a"])
    code, out, _ = invoke(cli_prefix, "dlq", "show", dead_letter_id)
    assert code == 0
    assert f"id: {dead_letter_id}" in out
    assert "error_type: KeyError" in out
    assert '"name": "a"' in out


def test_show_json_round_trips(cli_prefix: str) -> None:
    (dead_letter_id,) = seed(cli_prefix, ["a"])
    code, out, _ = invoke(cli_prefix, "dlq", "show", dead_letter_id, "--json")
    shown = json.loads(out)
    assert code == 0
    assert shown["id"] == dead_letter_id
    assert shown["subscription"] == "billing"
    assert shown["reason"] == "gave up"


def test_show_unknown_id_fails(cli_prefix: str) -> None:
    code, _, err = invoke(cli_prefix, "dlq", "show", "jobs/1-0")
    assert code == 1
    assert "no dead letter 'jobs/1-0'" in err


# -- replay ------------------------------------------------------------------------


def test_replay_then_fixed_handler_runs_once(cli_prefix: str) -> None:
    handled: list[tuple[str, int]] = []

    async def run_subscription(broken: bool, until: Any) -> None:
        bus = Bus(REDIS_URL, prefix=cli_prefix, service="svc")

        @bus.subscribe(
            "jobs", durable=True, raw=True, retry=RetryPolicy(max_attempts=1)
        )
        async def handle(event: Event[Any], delivery: Delivery) -> None:
            if broken:
                raise RuntimeError("bug")
            handled.append((event.id, delivery.attempt))

        async with bus:
            await until(bus)

    async def fail_once(bus: Bus) -> None:
        await bus.publish("jobs", {"n": 1}, type="job", raw=True, durable=True)
        await eventually(lambda: bus.dlq.count(), what="a dead letter")

    async def handled_once(bus: Bus) -> None:
        await eventually(lambda: handled, what="the replayed event handled")

    asyncio.run(run_subscription(True, fail_once))
    code, out, _ = invoke(cli_prefix, "dlq", "list", "--json")
    (row,) = [json.loads(line) for line in out.splitlines()]
    replay_code, replay_out, _ = invoke(cli_prefix, "dlq", "replay", row["id"])
    asyncio.run(run_subscription(False, handled_once))
    _, after, _ = invoke(cli_prefix, "dlq", "list", "--json")

    assert code == 0
    assert replay_code == 0
    assert "replayed 1 dead letter(s)" in replay_out
    assert handled == [(row["event_id"], 1)]
    assert after == ""


def test_replay_all_one_subscription(cli_prefix: str) -> None:
    billing = seed(cli_prefix, ["a", "b"], group="billing")
    (shipping,) = seed(cli_prefix, ["c"], group="shipping")
    code, out, _ = invoke(
        cli_prefix, "dlq", "replay", "--all", "--subscription", "billing"
    )
    _, left, _ = invoke(cli_prefix, "dlq", "list", "--json")

    assert code == 0
    assert "replayed 2 dead letter(s)" in out
    assert all(dead_letter_id in out for dead_letter_id in billing)
    assert [json.loads(line)["id"] for line in left.splitlines()] == [shipping]
    assert redo_length(cli_prefix, "billing") == 2
    assert redo_length(cli_prefix, "shipping") == 0


def test_replay_needs_id_or_all(cli_prefix: str) -> None:
    code, _, err = invoke(cli_prefix, "dlq", "replay")
    assert code == 2
    assert "give one dead-letter ID, or --all" in err


def test_replay_unknown_id_fails(cli_prefix: str) -> None:
    code, _, err = invoke(cli_prefix, "dlq", "replay", "jobs/1-0")
    assert code == 1
    assert "no dead letter 'jobs/1-0'" in err


# -- purge ---------------------------------------------------------------------------


def test_purge_older_than_keeps_recent(cli_prefix: str) -> None:
    seed(cli_prefix, ["a", "b"])
    code, out, _ = invoke(cli_prefix, "dlq", "purge", "--older-than", "1h")
    _, left, _ = invoke(cli_prefix, "dlq", "list", "--json")
    assert code == 0
    assert "purged 0 dead letter(s)" in out
    assert len(left.splitlines()) == 2


def test_purge_all_empties(cli_prefix: str) -> None:
    seed(cli_prefix, ["a", "b"])
    code, out, _ = invoke(cli_prefix, "dlq", "purge")
    _, left, _ = invoke(cli_prefix, "dlq", "list", "--json")
    assert code == 0
    assert "purged 2 dead letter(s)" in out
    assert left == ""


def test_purge_invalid_duration_fails(cli_prefix: str) -> None:
    code, _, err = invoke(cli_prefix, "dlq", "purge", "--older-than", "soon")
    assert code == 2
    assert "invalid duration 'soon'" in err


def test_purge_empty_duration_deletes_nothing() -> None:
    result = CliRunner().invoke(app, ["dlq", "purge", "--older-than", ""])
    assert result.exit_code == 2
    assert "invalid duration ''" in result.stderr
