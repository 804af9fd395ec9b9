"""Killing and restarting team workers mid-task, cancelling, and plan approval."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from hivebus import Bus
from hivebus.team.client import TaskClient
from hivebus.team.models import ProgressUpdate
from hivebus.team.report import build_report
from hivebus.team.work import ROLES
from tests.conftest import REDIS_URL, eventually, new_prefix
from tests.team_harness import Workers, read_log
from tests.test_team_workers import hivebus

TASK = "Add CSV export to the orders page: filter by date range, include totals"
CLAIM = 2.0  # seconds before a live worker claims a dead one's entries
DEADLINE = 90.0  # seconds a task may take, kills and restarts included

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.fixture
def team_prefix() -> Iterator[str]:
    prefix = new_prefix()
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


@pytest.fixture
def workers(team_prefix: str, tmp_path: Path) -> Iterator[Workers]:
    helper = Workers(REDIS_URL, team_prefix, tmp_path)
    yield helper
    helper.stop()


@pytest.fixture
async def client(team_prefix: str) -> AsyncIterator[TaskClient]:
    bus = Bus(REDIS_URL, prefix=team_prefix, service="test-client")
    await bus.connect()
    yield TaskClient(bus)
    await bus.stop()


async def finish(client: TaskClient, task_id: str) -> ProgressUpdate:
    async with asyncio.timeout(DEADLINE):
        async for update in client.follow(task_id):
            if update.final:
                return update
    raise AssertionError(f"task {task_id} has no final update")


async def wait_request(workers: Workers, name: str, role: str, story: str) -> None:
    """Wait until the scripted worker ``name`` logged a request for ``story``."""

    def seen() -> bool:
        return any(
            r["role"] == role and r["story"] == story
            for r in read_log(workers.log(name))
        )

    await eventually(seen, timeout=DEADLINE, what=f"{role} request for {story}")


def kill(process: Any) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


async def open_work(client: TaskClient, task_id: str, key: str) -> list[Any]:
    """Return the open work of one story, as ``tasks show`` reports it."""
    report = await build_report(client, task_id)
    return next(s["open_work"] for s in report["stories"] if s["key"] == key)


def events_of(report: dict[str, Any], event_type: str, subject: str) -> list[Any]:
    return [
        event
        for event in report["events"]
        if event["type"] == event_type and event["subject"] == subject
    ]


async def test_developer_killed_mid_story(workers: Workers, client: TaskClient) -> None:
    for role in ("master", "pm", "ux", "tester"):
        workers.cli(role, claim=CLAIM)
    first = workers.scripted(
        "developer", "dev-a", claim=CLAIM, slow={"developer:S2": 5}
    )
    task_id = await client.submit(TASK)
    await wait_request(workers, "dev-a", "developer", "S2")
    working = await open_work(client, task_id, "S2")
    kill(first)

    async def waiting() -> bool:
        work = await open_work(client, task_id, "S2")
        return [w["state"] for w in work] == ["waiting"]

    await eventually(waiting, timeout=CLAIM + 5, what="S2 shown as waiting")
    waited = await open_work(client, task_id, "S2")
    workers.scripted("developer", "dev-b", claim=CLAIM)
    final = await finish(client, task_id)
    report = await build_report(client, task_id)
    requests = read_log(workers.log("dev-a")) + read_log(workers.log("dev-b"))
    story = next(s for s in report["stories"] if s["key"] == "S2")

    assert [(w["role"], w["state"]) for w in working] == [("developer", "working")]
    assert waited[0]["role"] == "developer"
    assert waited[0]["seconds"] is not None
    assert "worker" not in waited[0]
    assert final.status == "completed"
    assert story["status"] == "passed"
    implemented = events_of(report, "team.implementation.done", "S2")
    assert len(implemented) == story["rounds"]
    first_round = [
        r for r in requests if r["story"] == "S2" and r["role"] == "developer"
    ]
    assert len(first_round) <= 2 * story["rounds"]
    assert any(r["story"] == "S2" for r in read_log(workers.log("dev-b")))


async def test_master_restart_mid_task(workers: Workers, client: TaskClient) -> None:
    master = workers.cli("master", claim=CLAIM)
    for role in ("pm", "ux", "tester"):
        workers.cli(role, claim=CLAIM)
    workers.scripted("developer", "dev", claim=CLAIM, slow={"developer:S1": 2})
    task_id = await client.submit(TASK)

    async def assigned() -> bool:
        updates = await client.progress.entries(task_id)
        return any("stories assigned" in u.message for u in updates)

    await eventually(assigned, timeout=DEADLINE, what="stories assigned")
    kill(master)
    workers.cli("master", claim=CLAIM)
    final = await finish(client, task_id)
    report = await build_report(client, task_id)
    requests = read_log(workers.log("dev"))

    assert final.status == "completed"
    for story in report["stories"]:
        key = story["key"]
        implemented = events_of(report, "team.implementation.done", key)
        asked = [r for r in requests if r["story"] == key]
        assert len(implemented) == story["rounds"], key
        assert len(asked) == story["rounds"], key


async def test_round_limit_survives_restart(
    workers: Workers, client: TaskClient
) -> None:
    for role in ("master", "pm", "ux"):
        workers.cli(role, claim=CLAIM)
    workers.scripted("tester", "tester", claim=CLAIM, failing_tester=True)
    first = workers.scripted(
        "developer", "dev-a", claim=CLAIM, slow={"developer:S1": 2}
    )
    task_id = await client.submit(TASK, max_test_rounds=2)

    def round_two() -> bool:
        asked = read_log(workers.log("dev-a"))
        return sum(1 for r in asked if r["story"] == "S1") >= 2

    await eventually(round_two, timeout=DEADLINE, what="round 2 request for S1")
    kill(first)
    workers.scripted("developer", "dev-b", claim=CLAIM, slow={"developer:S1": 2})
    final = await finish(client, task_id)
    report = await build_report(client, task_id)
    story = next(s for s in report["stories"] if s["key"] == "S1")

    assert final.status == "failed"
    assert "story S1" in (final.reason or "")
    assert "all 2 of 2 rounds" in (final.reason or "")
    assert story["rounds"] == 2
    assert len(events_of(report, "team.implementation.done", "S1")) == 2
    assert len(events_of(report, "team.test.reported", "S1")) == 2
    assert [r["round"] for r in story["results"]] == [1, 2]


async def test_cancel_without_workers(
    workers: Workers, client: TaskClient, team_prefix: str
) -> None:
    task_id = await client.submit(TASK)
    code, out, err = await hivebus(team_prefix, "tasks", "cancel", task_id)
    final = await client.progress.ending(task_id)
    for role in ROLES:
        workers.scripted(role, role, claim=CLAIM)
    stream = client.bus.keys.stream("team.tasks")

    async def consumed() -> bool:
        groups = await client.bus.client.xinfo_groups(stream)
        master = [g for g in groups if g["name"] in (b"master", "master")]
        return bool(master) and master[0]["lag"] == 0 and master[0]["pending"] == 0

    await eventually(consumed, timeout=DEADLINE, what="submitted entry consumed")
    record = await client.get(task_id)

    assert code == 0, err
    assert "cancelled" in out
    assert final is not None
    assert final.status == "cancelled"
    assert record.status == "cancelled"
    for role in ROLES:
        assert read_log(workers.log(role)) == [], role


async def test_approval_survives_master_restart(
    workers: Workers, client: TaskClient, team_prefix: str
) -> None:
    master = workers.scripted("master", "master-a", claim=CLAIM)
    workers.scripted("pm", "pm", claim=CLAIM)
    for role in ("developer", "ux", "tester"):
        workers.scripted(role, role, claim=CLAIM)
    task_id = await client.submit(TASK, approve_plan=True)

    async def awaiting() -> bool:
        return (await client.get(task_id)).status == "awaiting_approval"

    await eventually(awaiting, timeout=DEADLINE, what="awaiting approval")
    kill(master)
    workers.scripted("master", "master-b", claim=CLAIM)
    code, shown, _ = await hivebus(team_prefix, "tasks", "show", task_id, "--json")
    before = json.loads(shown)["task"]
    worked_before = sum(
        len(read_log(workers.log(role))) for role in ("developer", "ux", "tester")
    )
    answers = await asyncio.gather(
        hivebus(team_prefix, "tasks", "approve", task_id),
        hivebus(team_prefix, "tasks", "approve", task_id),
    )
    final = await finish(client, task_id)
    report = await build_report(client, task_id)
    unknown = await hivebus(team_prefix, "tasks", "approve", "no-such-task")
    ended = await hivebus(team_prefix, "tasks", "approve", task_id)
    planning = read_log(workers.log("master-a")) + read_log(workers.log("master-b"))

    assert code == 0
    assert before["status"] == "awaiting_approval"
    assert before["plan_version"] == 1
    assert worked_before == 0
    assert [answer[0] for answer in answers] == [0, 0]
    outputs = sorted(answer[1] for answer in answers)
    assert "already approved" in outputs[0] + outputs[1]
    assert sum("already approved" in output for output in outputs) == 1
    assert final.status == "completed"
    assert len(planning) == 1
    assigned = events_of_type(report, "team.story.assigned")
    keys = [(event["subject"], event["summary"]) for event in assigned]
    assert len(keys) == len(set(keys))
    assert unknown[0] == 1
    assert "'no-such-task'" in unknown[2]
    assert ended[0] == 1
    assert "already ended (completed)" in ended[2]


def events_of_type(report: dict[str, Any], event_type: str) -> list[Any]:
    return [event for event in report["events"] if event["type"] == event_type]
