"""The team flow in one process: plan, stories, rounds, prompts, budget, approval."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from hivebus import Bus
from hivebus.errors import TaskError, TaskNotFoundError
from hivebus.team.brain import FEEDBACK, FINDINGS, Usage, prompt_sections
from hivebus.team.client import TaskClient
from hivebus.team.config import TeamSettings
from hivebus.team.models import ProgressUpdate, TaskEnded
from hivebus.team.project import context_id
from hivebus.team.prompts import PromptStore
from hivebus.team.report import build_report
from hivebus.team.runner import Team
from tests.conftest import eventually
from tests.team_harness import ScriptedBrain

TASK = "Add CSV export to the orders page: filter by date range, include totals"
LONG_TASK = (
    "Add CSV export to the orders page: filter by date range, include totals, "
    "record who exported"
)
DEADLINE = 30.0  # seconds a whole task may take in these tests


@asynccontextmanager
async def team_on(
    make_bus: Callable[..., Bus], brain: ScriptedBrain, **options: Any
) -> AsyncIterator[Team]:
    team = Team(make_bus(service="team"), brain=brain, **options)
    async with team:
        yield team


async def finish(client: TaskClient, task_id: str) -> ProgressUpdate:
    """Wait for a task's final update and return it."""
    async with asyncio.timeout(DEADLINE):
        async for update in client.follow(task_id):
            if update.final:
                return update
    raise AssertionError(f"task {task_id} has no final update")


async def wait_status(client: TaskClient, task_id: str, status: str) -> None:
    async def reached() -> bool:
        return (await client.get(task_id)).status == status

    await eventually(reached, timeout=DEADLINE, what=f"task status {status}")


async def test_task_completes_every_role(make_bus: Any) -> None:
    brain = ScriptedBrain()
    async with team_on(make_bus, brain) as team:
        task_id = await team.client.submit(TASK)
        final = await finish(team.client, task_id)
        report = await build_report(team.client, task_id)
        updates = await team.client.progress.entries(task_id)
        context = await team.projects.manager.get(context_id("default"))

    assert final.status == "completed"
    assert final.percent == 100
    assert {story["status"] for story in report["stories"]} == {"passed"}
    assert {call["role"] for call in report["calls"]} == {
        "master",
        "pm",
        "developer",
        "ux",
        "tester",
    }
    ids = [tuple(int(part) for part in u.id.split("-")) for u in updates]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert [u.final for u in updates].count(True) == 1
    assert updates[-1].final
    for section in ("planning", "implementation", "design", "test_results"):
        assert task_id in context.data[section], section


async def test_failed_round_teaches_developer(make_bus: Any) -> None:
    brain = ScriptedBrain()
    async with team_on(make_bus, brain) as team:
        first = await team.client.submit(LONG_TASK)
        assert (await finish(team.client, first)).status == "completed"
        first_report = await build_report(team.client, first)
        second = await team.client.submit(LONG_TASK)
        assert (await finish(team.client, second)).status == "completed"
        second_report = await build_report(team.client, second)
        history = await PromptStore(team.bus.client, team.bus.keys).history("developer")

    story = first_report["stories"][0]
    missed = story["results"][0]["findings"][0]["criterion"]
    assert [r["passed"] for r in story["results"]] == [False, True]
    round_two = [
        ask
        for ask in brain.asks
        if ask.task_id == first and ask.role == "developer" and ask.story_key == "S1"
    ][-1]
    assert missed in prompt_sections(round_two.prompt)[FINDINGS]
    assert round_two.prompt_version == 2
    assert [v.version for v in history] == [1, 2]
    assert missed in history[1].reason
    assert story["results"][0]["test_event"] in history[1].triggers
    assert first_report["prompt_changes"][0]["version"] == 2
    second_versions = {
        call["prompt_version"]
        for call in second_report["calls"]
        if call["role"] == "developer"
    }
    assert second_versions == {2}
    assert {s["rounds"] for s in second_report["stories"]} == {1}


async def test_round_limit_fails_task(make_bus: Any) -> None:
    brain = ScriptedBrain(failing_tester=True)
    async with team_on(make_bus, brain) as team:
        task_id = await team.client.submit(TASK, max_test_rounds=2)
        final = await finish(team.client, task_id)
        report = await build_report(team.client, task_id)
    asks_after_stop = len(brain.asks)

    assert final.status == "failed"
    assert "story S1" in (final.reason or "")
    assert "all 2 of 2 rounds" in (final.reason or "")
    stories = report["stories"]
    for story in stories:
        events = [e for e in report["events"] if e["subject"] == story["key"]]
        implemented = [e for e in events if e["type"] == "team.implementation.done"]
        tested = [e for e in events if e["type"] == "team.test.reported"]
        assert len(implemented) == 2, story["key"]
        assert len(tested) == 2, story["key"]
        assert story["status"] == "failed"
    designs = sum(1 for s in stories if s["needs_design"])
    assert asks_after_stop == 2 + len(stories) * 2 * 2 + designs


async def test_token_budget_stops_task(make_bus: Any) -> None:
    brain = ScriptedBrain(usage=Usage(prompt_tokens=100, completion_tokens=50))
    async with team_on(make_bus, brain) as team:
        task_id = await team.client.submit(TASK, token_budget=400)
        final = await finish(team.client, task_id)
        tokens = await team.client.store.tokens(task_id)
    asks = len(brain.asks)

    assert final.status == "failed"
    assert "token budget spent" in (final.reason or "")
    assert "budget of 400" in (final.reason or "")
    assert tokens["task"]["total"] == 150 * asks
    assert tokens["master"]["total"] == 150
    assert tokens["pm"]["total"] == 150
    assert asks <= 7


async def test_cancel_skips_pending_work(make_bus: Any) -> None:
    client = TaskClient(make_bus(service="client"))
    task_id = await client.submit(TASK)
    message = await client.cancel(task_id)
    final = await finish(client, task_id)
    brain = ScriptedBrain()
    async with team_on(make_bus, brain) as team:
        stream = team.bus.keys.stream("team.tasks")

        async def consumed() -> bool:
            pending = await team.bus.client.xpending(stream, "master")
            groups = await team.bus.client.xinfo_groups(stream)
            last = groups[0]["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            return pending["pending"] == 0 and last != "0-0"

        await eventually(consumed, timeout=DEADLINE, what="submitted entry consumed")
        record = await team.client.get(task_id)

    assert "cancelled" in message
    assert final.status == "cancelled"
    assert final.reason == "cancelled by user"
    assert record.status == "cancelled"
    assert brain.asks == []
    with pytest.raises(TaskError, match="already ended"):
        await client.cancel(task_id)
    await client.bus.stop()


async def test_approval_survives_master_restart(make_bus: Any) -> None:
    brain = ScriptedBrain()
    async with team_on(make_bus, brain) as team:
        task_id = await team.client.submit(TASK, approve_plan=True)
        await wait_status(team.client, task_id, "awaiting_approval")
        waiting = await team.client.get(task_id)
    roles_before = {ask.role for ask in brain.asks}

    restarted = ScriptedBrain()
    async with team_on(make_bus, restarted) as team:
        still = await team.client.get(task_id)
        first = await team.client.approve(task_id)
        second = await team.client.approve(task_id)
        final = await finish(team.client, task_id)
        report = await build_report(team.client, task_id)
        with pytest.raises(TaskNotFoundError, match="'no-such-task'"):
            await team.client.approve("no-such-task")
        with pytest.raises(TaskError, match="already ended"):
            await team.client.approve(task_id)

    assert roles_before == {"master", "pm"}
    assert still.status == "awaiting_approval"
    assert still.plan_version == waiting.plan_version == 1
    assert "approved" in first
    assert "already approved" in second
    assert final.status == "completed"
    assert [a.role for a in restarted.asks].count("master") == 0
    assignments = [e for e in report["events"] if e["type"] == "team.story.assigned"]
    keys = [(e["subject"], e["summary"]) for e in assignments]
    assert len(keys) == len(set(keys))


async def test_reject_replans_with_comment(make_bus: Any) -> None:
    brain = ScriptedBrain()
    comment = "split story 2 into two stories"
    async with team_on(make_bus, brain) as team:
        task_id = await team.client.submit(TASK, approve_plan=True)
        await wait_status(team.client, task_id, "awaiting_approval")
        await team.client.reject(task_id, comment)

        async def replanned() -> bool:
            task = await team.client.get(task_id)
            return task.status == "awaiting_approval" and task.plan_version == 2

        await eventually(replanned, timeout=DEADLINE, what="revised plan awaiting")
        await team.client.approve(task_id)
        final = await finish(team.client, task_id)

    planning = [ask for ask in brain.asks if ask.role == "master"]
    assert len(planning) == 2
    assert FEEDBACK not in prompt_sections(planning[0].prompt)
    assert comment in prompt_sections(planning[1].prompt)[FEEDBACK]
    assert final.status == "completed"


async def test_approval_timeout_fails_task(make_bus: Any) -> None:
    settings = TeamSettings(approval_timeout=0.5)
    async with team_on(make_bus, ScriptedBrain(), settings=settings) as team:
        task_id = await team.client.submit(TASK, approve_plan=True)
        final = await finish(team.client, task_id)

    assert final.status == "failed"
    assert (final.reason or "").startswith("approval timed out")


async def test_follow_resumes_without_gaps(make_bus: Any) -> None:
    async with team_on(make_bus, ScriptedBrain()) as team:
        task_id = await team.client.submit(TASK)
        head: list[ProgressUpdate] = []
        async for update in team.client.follow(task_id):
            head.append(update)
            if len(head) == 5:
                break
        tail = [u async for u in team.client.follow(task_id, head[-1].id)]
        stored = await team.client.progress.entries(task_id)
        after_end = [u async for u in team.client.follow(task_id, tail[-1].id)]

    assert [u.id for u in head + tail] == [u.id for u in stored]
    assert tail[-1].final
    assert after_end == []


async def test_brain_failure_fails_story(make_bus: Any) -> None:
    brain = ScriptedBrain(broken_roles=("ux",))
    async with team_on(make_bus, brain) as team:
        task_id = await team.client.submit(TASK)
        final = await finish(team.client, task_id)
        report = await build_report(team.client, task_id)

    designed = [s for s in report["stories"] if s["needs_design"]]
    assert final.status == "failed"
    assert designed
    for story in designed:
        assert story["status"] == "failed"
        assert f"story {story['key']} failed: the ux" in (final.reason or "")
    assert "scripted failure" in (final.reason or "")


async def test_concurrent_tasks_keep_apart(make_bus: Any) -> None:
    tokens = [f"TOKEN-{letter}" for letter in "ABCDE"]
    async with team_on(make_bus, ScriptedBrain()) as team:
        ids = [
            await team.client.submit(
                f"Add {token} export to the orders page: include totals",
                project="P1" if index < 3 else "P2",
            )
            for index, token in enumerate(tokens)
        ]
        finals = await asyncio.gather(*(finish(team.client, i) for i in ids))
        reports = [await build_report(team.client, i) for i in ids]
        contexts = {
            name: (await team.projects.manager.get(context_id(name))).data
            for name in ("P1", "P2")
        }

    assert {final.status for final in finals} == {"completed"}
    for token, task_id, report in zip(tokens, ids, reports, strict=True):
        assert {e["correlationid"] for e in report["events"]} == {task_id}
        text = str(report["stories"])
        assert token in text
        assert not [t for t in tokens if t != token and t in text]
    assert not [t for t in tokens[3:] if t in str(contexts["P1"])]
    assert not [t for t in tokens[:3] if t in str(contexts["P2"])]
    assert set(contexts["P1"]["tasks"]) == set(ids[:3])


@pytest.mark.slow
async def test_dead_letter_fails_task(make_bus: Any) -> None:
    class CrashingBrain(ScriptedBrain):
        async def think(self, ask: Any) -> Any:
            if ask.role == "tester":
                raise RuntimeError("tester crashed")
            return await super().think(ask)

    async with team_on(make_bus, CrashingBrain()) as team:
        task_id = await team.client.submit(TASK)
        final = await finish(team.client, task_id)

    assert final.status == "failed"
    assert "team.story.assigned event on team.work.tester was dead-lettered" in (
        final.reason or ""
    )


async def test_late_designer_still_completes(make_bus: Any) -> None:
    roles = ("master", "pm", "developer", "tester")
    async with team_on(make_bus, ScriptedBrain(), roles=roles) as team:
        task_id = await team.client.submit(TASK)

        async def story_passed() -> bool:
            state = await team.client.store.story(task_id, "S1")
            return state.get("status") == "passed"

        await eventually(story_passed, timeout=DEADLINE, what="S1 passed")
        waiting = await team.client.get(task_id)
        async with team_on(make_bus, ScriptedBrain(), roles=["ux"]):
            final = await finish(team.client, task_id)
        report = await build_report(team.client, task_id)

    assert waiting.status == "running"
    assert final.status == "completed"
    assert report["stories"][0]["design"] is not None


async def test_repeated_wait_keeps_approval(make_bus: Any) -> None:
    async with team_on(make_bus, ScriptedBrain()) as team:
        task_id = await team.client.submit(TASK, approve_plan=True)
        await wait_status(team.client, task_id, "awaiting_approval")
        await team.client.approve(task_id)
        task = await team.client.get(task_id)
        cause = team.bus.event(
            TaskEnded(task_id=task_id, status="running"), correlation_id=task_id
        )
        assert team.master is not None
        # A master that died before acking the last story event runs the
        # step again after the approval: it must not reopen the approval.
        await team.master._await_approval(task, 1, 2, cause)
        again = await team.client.get(task_id)
        final = await finish(team.client, task_id)

    assert again.approval == "approved"
    assert again.status == "running"
    assert final.status == "completed"
