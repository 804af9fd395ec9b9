"""The team with every role in its own worker process, on the shared Redis."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from hivebus import Bus
from hivebus.team.client import TaskClient
from hivebus.team.models import ProgressUpdate
from hivebus.team.report import build_report
from hivebus.team.work import ROLES
from tests.conftest import REDIS_URL, new_prefix
from tests.team_harness import Workers, read_log

TASK = "Add CSV export to the orders page: filter by date range, include totals"
ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 90.0  # seconds a task may take with every role in its own process

# The event types each event type may be caused by, in a task's event tree.
CAUSES = {
    "team.plan.created": {"team.task.submitted"},
    "team.story.created": {"team.plan.created"},
    "team.story.assigned": {
        "team.story.created",
        "team.implementation.done",
        "team.test.reported",
    },
    "team.implementation.done": {"team.story.assigned"},
    "team.design.done": {"team.story.assigned"},
    "team.test.reported": {"team.story.assigned"},
    "team.agent.status": {
        "team.task.submitted",
        "team.plan.created",
        "team.story.assigned",
    },
    "team.task.progress": {
        "team.agent.status",
        "team.story.created",
        "team.implementation.done",
        "team.test.reported",
        "team.design.done",
    },
    "team.task.ended": {"team.test.reported", "team.design.done"},
}


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


async def hivebus(prefix: str, *args: str) -> tuple[int, str, str]:
    """Run the ``hivebus`` command line in a subprocess; return code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "hivebus.cli", *args, "--redis", REDIS_URL, "--prefix", prefix),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_workers_build_event_tree(
    workers: Workers, client: TaskClient, team_prefix: str
) -> None:
    for role in ROLES:
        workers.cli(role)
    code, out, err = await hivebus(team_prefix, "submit", TASK, "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    task_id = lines[0]["task_id"]
    updates = lines[1:]
    report = await build_report(client, task_id)
    events = report["events"]
    by_id = {event["id"]: event for event in events}

    assert code == 0, err
    assert updates[-1]["final"]
    assert updates[-1]["status"] == "completed"
    stream_ids = [tuple(map(int, u["id"].split("-"))) for u in updates]
    assert stream_ids == sorted(set(stream_ids))
    assert {event["correlationid"] for event in events} == {task_id}
    roots = [event for event in events if event["causationid"] is None]
    assert [root["type"] for root in roots] == ["team.task.submitted"]
    assert [
        e for e in events if e["causationid"] and e["causationid"] not in by_id
    ] == []
    assert set(CAUSES) <= {event["type"] for event in events}
    for event in events:
        if event["causationid"] is None:
            continue
        cause = by_id[event["causationid"]]["type"]
        assert cause in CAUSES[event["type"]], (event["type"], cause)
    roles = {e["source"] for e in events if e["type"] == "team.agent.status"}
    assert roles == {f"team.{role}" for role in ROLES}


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_ten_tasks_two_developers(
    workers: Workers, client: TaskClient, tmp_path: Path
) -> None:
    for role in ("master", "pm", "ux", "tester"):
        workers.cli(role)
    workers.scripted("developer", "dev-a")
    workers.scripted("developer", "dev-b")
    tokens = [f"TOKEN-{letter}" for letter in "ABCDEFGHIJ"]
    ids = list(
        await asyncio.gather(
            *(
                client.submit(f"Add {token} export to the orders page: include totals")
                for token in tokens
            )
        )
    )
    finals = await asyncio.gather(*(finish(client, task_id) for task_id in ids))
    reports = [await build_report(client, task_id) for task_id in ids]
    requests = read_log(workers.log("dev-a")) + read_log(workers.log("dev-b"))
    token_of = dict(zip(ids, tokens, strict=True))

    assert [final.status for final in finals] == ["completed"] * len(ids)
    assert len(set(ids)) == len(ids)
    for request in requests:
        found = set(re.findall(r"TOKEN-[A-J]", json.dumps(request["sections"])))
        assert found == {token_of[request["task_id"]]}
    for task_id, report in zip(ids, reports, strict=True):
        assert {event["correlationid"] for event in report["events"]} == {task_id}
        found = set(re.findall(r"TOKEN-[A-J]", json.dumps(report["stories"])))
        assert found == {token_of[task_id]}
        calls = report["calls"]
        spent = sum(c["prompt_tokens"] + c["completion_tokens"] for c in calls)
        assert report["tokens"]["task"]["total"] == spent
    developer_calls = sum(
        1
        for report in reports
        for call in report["calls"]
        if call["role"] == "developer"
    )
    assert len(requests) == developer_calls


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_follow_reattaches_after_interrupt(
    workers: Workers, client: TaskClient, team_prefix: str
) -> None:
    for role in ("master", "pm", "ux", "tester"):
        workers.cli(role)
    workers.scripted("developer", "dev", slow={"developer:S1": 3})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "hivebus.cli", "submit", TASK),
        *("--redis", REDIS_URL, "--prefix", team_prefix),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    first = (await process.stdout.readline()).decode()
    task_id = first.split()[1]
    seen = [(await process.stdout.readline()).decode() for _ in range(3)]
    process.send_signal(signal.SIGINT)
    rest, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    printed = seen + rest.decode().splitlines(keepends=True)
    last_id = printed[-1].split()[0]
    code, out, _ = await hivebus(
        team_prefix, "tasks", "follow", task_id, "--from", last_id
    )
    stored = await client.progress.entries(task_id)
    ids = [line.split()[0] for line in printed + out.splitlines(keepends=True)]

    assert first == f"task {task_id} submitted\n"
    assert process.returncode == 130
    assert f"hivebus tasks follow {task_id} --from {last_id}" in err.decode()
    assert code == 0
    assert ids == [update.id for update in stored]
    assert stored[-1].status == "completed"
