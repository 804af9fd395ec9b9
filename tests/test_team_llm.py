"""The whole team against the fake model server over HTTP, on a real Redis.

Each test runs every role in one process (``Team``, or ``hivebus run
--json``) with ``HIVEBUS_BRAIN_URL`` pointing at ``tests.fake_llm``. The
fake returns valid JSON for each role's model, with usage of 100 prompt and
50 completion tokens, unless a test scripts it otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from hivebus import BreakerConfig, Bus
from hivebus.team.client import TaskClient
from hivebus.team.config import TeamSettings
from hivebus.team.models import ProgressUpdate
from hivebus.team.prompts import DEFAULT_PROMPTS
from hivebus.team.report import build_report
from hivebus.team.runner import Team
from tests.conftest import REDIS_URL
from tests.fake_llm import FakeLLM, Reply, Request

TASK = (
    "Add CSV export to the orders page: filter by date range, include totals, "
    "record who exported"
)
MODEL = "test-model"
DEADLINE = 45.0  # seconds a whole task may take in these tests

PLAN = {
    "summary": "Export orders as CSV and record each export.",
    "steps": [
        {"title": "Export", "goal": "Export the filtered orders as CSV."},
        {"title": "Audit", "goal": "Record who exported."},
    ],
}
STORIES = {
    "stories": [
        {
            "key": "S1",
            "title": "Export orders as CSV",
            "description": "Export the orders page as CSV.",
            "acceptance_criteria": ["filter by date range", "include totals"],
            "needs_design": True,
        },
        {
            "key": "S2",
            "title": "Record exports",
            "description": "Record who exported.",
            "acceptance_criteria": ["record who exported"],
        },
    ]
}
MISSING_CRITERIA = {
    "stories": [
        STORIES["stories"][0],
        {k: v for k, v in STORIES["stories"][1].items() if k != "acceptance_criteria"},
    ]
}
IMPLEMENTATION = {
    "story_key": "S1",
    "summary": "Added the CSV export endpoint.",
    "files": ["orders/export.py"],
    "covered_criteria": ["filter by date range"],
}
DESIGN = {
    "story_key": "S1",
    "summary": "An Export button above the orders table.",
    "screens": ["orders list with export button"],
}
PASSED = {"story_key": "S1", "passed": True, "findings": []}
VALID: dict[str, Any] = {
    "master": PLAN,
    "pm": STORIES,
    "developer": IMPLEMENTATION,
    "ux": DESIGN,
    "tester": PASSED,
}
SCHEMA_NAMES = {
    "master": "Plan",
    "pm": "StoryList",
    "developer": "Implementation",
    "ux": "Design",
    "tester": "TestReport",
}
WORKER_ROLES = ("master", "pm", "developer", "ux", "tester")


@pytest.fixture
def backend() -> str:
    """Run on the real Redis only: these tests are about the model server."""
    return "redis"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLLM]:
    """The fake model server with a valid reply for every role, as the brain."""
    server = FakeLLM().start()
    for role, value in VALID.items():
        server.script(role, Reply.of(value))
    monkeypatch.setenv("HIVEBUS_BRAIN_URL", server.url)
    monkeypatch.setenv("HIVEBUS_BRAIN_MODEL", MODEL)
    yield server
    server.stop()


async def run_task(
    make_bus: Callable[..., Bus], text: str = TASK
) -> tuple[ProgressUpdate, dict[str, Any]]:
    """Run one task with every role in this process; return its end and report."""
    async with Team(make_bus(service="team")) as team:
        task_id = await team.client.submit(text)
        final = await finish(team, task_id)
        report = await build_report(team.client, task_id)
    return final, report


async def run_cli(prefix: str, directory: Path) -> tuple[int, str, str]:
    """Run ``hivebus run TASK --json`` in a subprocess; return exit code and output."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "hivebus.cli", "run", TASK, "--json"),
        *("--redis", REDIS_URL, "--prefix", prefix, "--report-dir", str(directory)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(DEADLINE):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def finish(team: Team, task_id: str) -> ProgressUpdate:
    """Wait for a task's final update and return it."""
    async with asyncio.timeout(DEADLINE):
        async for update in team.client.follow(task_id):
            if update.final:
                return update
    raise AssertionError(f"task {task_id} has no final update")


# -- a whole task ----------------------------------------------------------


async def test_task_completes_through_fake(fake: FakeLLM, make_bus: Any) -> None:
    final, report = await run_task(make_bus)

    assert final.status == "completed", final.reason
    assert {r.role for r in fake.requests} == set(WORKER_ROLES)
    for request in fake.requests:
        role = request.role or "unknown"
        assert request.path.endswith("/v1/chat/completions"), role
        assert request.body["model"] == MODEL, role
        assert [m["role"] for m in request.messages] == ["system", "user"], role
        assert request.system.startswith(DEFAULT_PROMPTS[role]), role
        assert request.last_user.startswith("## "), role
        response_format = request.body["response_format"]
        assert response_format["type"] == "json_schema", role
        assert response_format["json_schema"]["name"] == SCHEMA_NAMES[role], role

    assert report["plan"]["summary"] == PLAN["summary"]
    stories = {story["key"]: story for story in report["stories"]}
    assert [story["title"] for story in stories.values()] == [
        story["title"] for story in STORIES["stories"]
    ]
    assert {story["status"] for story in stories.values()} == {"passed"}
    assert stories["S1"]["design"]["summary"] == DESIGN["summary"]
    for story in stories.values():
        (result,) = story["results"]
        assert result["implementation"]["summary"] == IMPLEMENTATION["summary"]
        assert result["implementation"]["story_key"] == story["key"]
        assert result["passed"] is True
    assert all(call["rejections"] == [] for call in report["calls"])

    tokens = report["tokens"]
    for role in WORKER_ROLES:
        count = len(fake.for_role(role))
        assert tokens[role]["prompt"] == 100 * count, role
        assert tokens[role]["completion"] == 50 * count, role
        assert tokens[role]["total"] == 150 * count, role
        assert tokens[role]["calls"] == count, role
        assert "estimated" not in tokens[role], role
    role_sum = sum(tokens[role]["total"] for role in WORKER_ROLES)
    assert tokens["task"]["total"] == role_sum
    assert tokens["task"]["total"] == 150 * len(fake.requests)


# -- replies that do not fit -------------------------------------------------


async def test_bad_replies_repaired_via_cli(
    fake: FakeLLM, make_bus: Any, prefix: str, tmp_path: Path
) -> None:
    fenced = (
        "Here is the implementation.\n"
        f"```json\n{json.dumps(IMPLEMENTATION, indent=2)}\n```\n"
    )
    fake.script("pm", Reply.of(MISSING_CRITERIA), Reply.of(STORIES))
    fake.script("developer", Reply(content=fenced))

    code, out, err = await run_cli(prefix, tmp_path)

    assert code == 0, err
    assert "Traceback" not in out
    assert "Traceback" not in err
    summary = json.loads(out.splitlines()[-1])
    assert summary["status"] == "completed"
    assert len(fake.for_role("pm")) == 2
    first, retry = fake.for_role("pm")
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert [m["role"] for m in retry.messages] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    assert retry.messages[2]["content"] == json.dumps(MISSING_CRITERIA)
    assert "stories.1.acceptance_criteria" in retry.last_user
    assert "Field required" in retry.last_user
    developer = fake.for_role("developer")
    assert len(developer) == len(STORIES["stories"])
    assert all(len(request.messages) == 2 for request in developer)

    client = TaskClient(make_bus(service="client"))
    report = await build_report(client, summary["task_id"])
    calls = report["calls"]
    (pm_call,) = [call for call in calls if call["role"] == "pm"]
    assert [r["kind"] for r in pm_call["rejections"]] == ["schema"]
    developer_calls = [call for call in calls if call["role"] == "developer"]
    assert len(developer_calls) == len(developer)
    assert all(call["rejections"] == [] for call in developer_calls)
    assert report["tokens"]["pm"]["total"] == 150 * 2
    assert report["tokens"]["pm"]["calls"] == 2


async def test_pm_never_fits_fails_planning(fake: FakeLLM, make_bus: Any) -> None:
    attempts = TeamSettings().brain_max_attempts
    fake.script("pm", Reply.of(MISSING_CRITERIA))
    started = time.monotonic()

    final, report = await run_task(make_bus)
    elapsed = time.monotonic() - started

    reason = final.reason or ""
    assert attempts == 3
    assert final.status == "failed"
    assert reason.startswith("the pm failed:")
    assert f"in {attempts} replies" in reason
    assert "stories.1.acceptance_criteria: Field required" in reason
    assert len(fake.for_role("pm")) == attempts
    assert {r.role for r in fake.requests} == {"master", "pm"}
    assert report["tokens"]["pm"]["total"] == 150 * attempts
    assert report["tokens"]["pm"]["calls"] == attempts
    (call,) = [call for call in report["calls"] if call["role"] == "pm"]
    assert [r["kind"] for r in call["rejections"]] == ["schema"] * attempts
    assert elapsed < attempts * TeamSettings().brain_timeout


# -- server trouble ------------------------------------------------------------


@pytest.mark.slow
async def test_server_errors_open_breaker(fake: FakeLLM, make_bus: Any) -> None:
    # Each developer call sends at most `brain_server_retries` requests, with
    # backoffs of at most 0.5 s and 1 s between them (OpenAIBrain's defaults).
    # The breaker opens when the failures reach its threshold, and calls
    # after that fail without a request.
    retries = TeamSettings().brain_server_retries
    threshold = BreakerConfig().failure_threshold
    stories = len(STORIES["stories"])
    fake.script("developer", Reply.error(500, {"error": {"message": "boom"}}))
    started = time.monotonic()

    async with Team(make_bus(service="team")) as team:
        task_id = await team.client.submit(TASK)
        final = await finish(team, task_id)
        breaker = await team.bus.breaker("brain").state()
    elapsed = time.monotonic() - started

    reason = final.reason or ""
    developer = len(fake.for_role("developer"))
    assert final.status == "failed"
    assert "the developer gave no usable answer" in reason
    assert "role developer" in reason
    assert urlsplit(fake.url).netloc in reason
    assert "HTTP 500: boom" in reason
    assert breaker.state == "open"
    assert threshold <= developer <= stories * retries
    assert fake.for_role("tester") == []
    assert len(fake.requests) <= 3 + stories * retries  # one each: master, pm, ux
    assert elapsed < 15.0


async def test_response_format_400_dropped(
    fake: FakeLLM, make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def strict(request: Request) -> Reply | None:
        if "response_format" not in request.body:
            return None
        error = {
            "message": "response_format is not supported",
            "code": "unsupported_parameter",
            "param": "response_format",
        }
        return Reply.error(400, {"error": error})

    fake.on_request = strict
    caplog.set_level(logging.WARNING, logger="hivebus.team.openai_brain")

    final, report = await run_task(make_bus)

    assert final.status == "completed", final.reason
    first, *rest = fake.requests
    assert "response_format" in first.body
    assert all("response_format" not in r.body for r in rest)
    warnings = [r for r in caplog.records if "field=response_format" in r.message]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert fake.url in warnings[0].message
    (master,) = [call for call in report["calls"] if call["role"] == "master"]
    assert any("response_format" in note for note in master["notes"])


async def test_quota_error_fails_fast(fake: FakeLLM, make_bus: Any) -> None:
    quota = {
        "error": {
            "message": "You exceeded your current quota",
            "type": "insufficient_quota",
            "code": "insufficient_quota",
        }
    }
    fake.on_request = lambda request: Reply.error(429, quota)
    started = time.monotonic()

    async with Team(make_bus(service="team")) as team:
        first_id = await team.client.submit(TASK)
        first = await finish(team, first_id)
        elapsed = time.monotonic() - started
        breaker = await team.bus.breaker("brain").state()
        sent = len(fake.requests)
        second_id = await team.client.submit(TASK)
        second = await finish(team, second_id)

    reason = first.reason or ""
    assert first.status == "failed"
    assert reason.startswith("planning failed:")
    assert "HTTP 429 insufficient_quota: You exceeded your current quota" in reason
    assert "quota or credit is used up" in reason
    assert sent == 1
    assert elapsed < 15.0
    assert breaker.state == "open"
    assert second.status == "failed"
    assert "circuit breaker 'brain' is open" in (second.reason or "")
    assert len(fake.requests) == sent
