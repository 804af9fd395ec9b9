"""The master: judges test rounds, ends tasks and learns from them.

It plans and assigns through ``Planner``, then:

1. ``team.implementation.done``: send the implementation to the tester.
2. ``team.test.reported``: a pass ends the story. A failure runs the prompt
   analyser, then sends the findings back to the developer, for at most the
   task's ``max_test_rounds`` rounds (the first included). After the last
   failed round the story fails.
3. When every story has ended, the task ends: ``completed`` if all passed,
   else ``failed`` with a reason naming each failed story. After the end the
   analyser runs once more on the whole outcome.

Model requests per task are at most: one master and one pm call per plan
version, ``max_test_rounds`` developer and tester calls per story, and one
UX call per story that needs a design. A brain may send more than one
request per call (replies it rejects), and a call repeats when its worker
dies before publishing the result.

Round counts and accepted results live in Redis (``TaskStore``), so a
master that restarts never resets a round. Agent status events become
progress updates on the task's progress stream, and a dead-lettered team
event fails its task instead of leaving it running.
"""

from __future__ import annotations

import logging
from typing import Any

from hivebus.errors import HivebusError
from hivebus.events import Event
from hivebus.subscription import Delivery
from hivebus.team.analyser import Analyser, RuleAnalyser, improve_prompts
from hivebus.team.learning import build_outcome
from hivebus.team.member import Crew
from hivebus.team.models import (
    AgentStatus,
    DesignDone,
    ImplementationDone,
    ProgressUpdate,
    TaskEnded,
    TestReported,
    WorkFailed,
)
from hivebus.team.planning import DAY, Planner, story_board
from hivebus.team.progress import Board
from hivebus.team.state import TaskRecord, now_ms
from hivebus.team.work import Finding, Story

logger = logging.getLogger(__name__)


class Master(Planner):
    """The master role: one instance per process, any number of processes."""

    def __init__(
        self,
        crew: Crew,
        *,
        analyser: Analyser | None = None,
        approval_timeout: float = DAY,
    ) -> None:
        super().__init__(crew, approval_timeout=approval_timeout)
        self.analyser = analyser or RuleAnalyser()

    # -- results ---------------------------------------------------------

    async def on_result(self, event: Event[Any], delivery: Delivery) -> None:
        """Route a result: implementation, design, test report, failure or task end."""
        result = event.data
        if isinstance(result, TaskEnded):
            await self._after_task(result, event)
            return
        task = await self.active_task(result.task_id, event)
        if task is None:
            await self._announce_end_again(result.task_id, event)
            return
        if isinstance(result, ImplementationDone):
            await self._implemented(task, result, event, delivery)
        elif isinstance(result, DesignDone):
            await self._designed(task, result, event)
        elif isinstance(result, TestReported):
            await self._tested(task, result, event, delivery)
        elif isinstance(result, WorkFailed):
            await self._work_failed(task, result, event)

    async def _announce_end_again(self, task_id: str, event: Event[Any]) -> None:
        """Announce a task's end again if ``event`` ended it (a redelivery)."""
        final = await self.crew.progress.ending(task_id)
        if final is not None and final.cause == event.id:
            await self.end_task(task_id, final.status, final.reason, event.id)

    async def _accept(
        self,
        task: TaskRecord,
        key: str,
        round: int | None,
        name: str,
        event: Event[Any],
    ) -> dict[str, str] | None:
        """Return the story's state if ``event`` is its current, first result.

        A redelivery of the accepted event is accepted again, whatever the
        story's state now, so that it finishes the steps its first run did
        not reach. Those steps are written so that repeating them is safe.
        """
        state = await self.store.story(task.id, key)
        if state.get(name) == event.id:
            return state
        current = state.get("status") == "in_progress" and (
            round is None or state.get("round") == str(round)
        )
        if current and await self.store.accept(task.id, key, name, event.id):
            return state
        logger.info(
            "result not accepted, stale or superseded task=%s story=%s result=%s "
            "event_id=%s status=%s round=%s",
            task.id,
            key,
            name,
            event.id,
            state.get("status"),
            state.get("round"),
        )
        return None

    async def _implemented(
        self,
        task: TaskRecord,
        done: ImplementationDone,
        event: Event[Any],
        delivery: Delivery,
    ) -> None:
        key, round = done.story_key, done.round
        if await self._accept(task, key, round, f"impl:{round}", event) is None:
            return
        story = await self._story(task, key)
        if story is None:
            return
        await self.store.set_story(
            task.id,
            key,
            testing_since_ms=now_ms(),
            **{f"impl_json:{round}": done.implementation.model_dump_json()},
        )
        message = f"{key} round {round}: implemented, sent to the tester"
        await self._story_progress(task, story, round, "testing", message, event)
        await self._assign(
            task,
            story,
            "tester",
            round,
            event,
            delivery,
            implementation=done.implementation,
        )

    async def _designed(
        self, task: TaskRecord, done: DesignDone, event: Event[Any]
    ) -> None:
        state = await self.store.story(task.id, done.story_key)
        if state.get("status") == "failed" or not await self.store.accept(
            task.id, done.story_key, "design", event.id
        ):
            return
        await self.store.set_story(
            task.id, done.story_key, design_json=done.design.model_dump_json()
        )
        await self._maybe_finish(task, event)

    async def _tested(
        self,
        task: TaskRecord,
        tested: TestReported,
        event: Event[Any],
        delivery: Delivery,
    ) -> None:
        key, round = tested.story_key, tested.round
        if await self._accept(task, key, round, f"test:{round}", event) is None:
            return
        story = await self._story(task, key)
        if story is None:
            return
        report = tested.report
        await self.store.set_story(
            task.id, key, **{f"report:{round}": report.model_dump_json()}
        )
        if report.passed:
            await self.store.set_story(task.id, key, status="passed")
            await self._story_progress(
                task,
                story,
                round,
                "passed",
                f"{key} passed its tests in round {round}",
                event,
            )
            await self._maybe_finish(task, event)
            return

        async def learn() -> None:
            await self._learn(task, "running", event)

        await delivery.run_once("learn", learn)
        if round < task.max_test_rounds:
            await self._next_round(task, story, round, report.findings, event, delivery)
            return
        first = report.findings[0].criterion if report.findings else "no findings given"
        rounds = (
            "its only round"
            if task.max_test_rounds == 1
            else f"all {round} of {task.max_test_rounds} rounds"
        )
        reason = (
            f"story {key} ({story.title}) failed its tests in {rounds}; "
            f"last finding: {first}"
        )
        await self.store.set_story(task.id, key, status="failed", reason=reason)
        await self._story_progress(task, story, round, "failed", reason, event)
        await self._maybe_finish(task, event)

    async def _next_round(
        self,
        task: TaskRecord,
        story: Story,
        round: int,
        findings: list[Finding],
        cause: Event[Any],
        delivery: Delivery,
    ) -> None:
        following = round + 1
        if not await self.store.advance_round(task.id, story.key, round):
            return  # a later round has started: this is a stale redelivery
        message = (
            f"{story.key} failed round {round} with {len(findings)} finding(s); "
            f"back to the developer for round {following} of {task.max_test_rounds}"
        )
        board = story_board(story, following, "in_progress")
        update = ProgressUpdate(
            task_id=task.id,
            kind="story",
            story_key=story.key,
            state="rework",
            round=following,
            message=message,
        )
        await self.advance(update, cause.id, board)
        await self._assign(
            task, story, "developer", following, cause, delivery, findings=findings
        )

    async def _work_failed(
        self, task: TaskRecord, failed: WorkFailed, event: Event[Any]
    ) -> None:
        if failed.story_key is None:
            reason = f"the {failed.role} failed: {failed.reason}"
            await self.end_task(task.id, "failed", reason, event.id)
            return
        key = failed.story_key
        state = await self.store.story(task.id, key)
        # A design can fail after the story passed its tests, so only an
        # already failed story ignores the failure.
        if state.get("status") == "failed" or not await self.store.accept(
            task.id, key, f"failed:{failed.role}:{failed.round}", event.id
        ):
            return
        reason = (
            f"story {key} failed: the {failed.role} gave no usable answer in round "
            f"{failed.round}: {failed.reason}"
        )
        await self.store.set_story(task.id, key, status="failed", reason=reason)
        story = await self._story(task, key)
        if story is not None:
            await self._story_progress(
                task, story, failed.round, "failed", reason, event
            )
        await self._maybe_finish(task, event)

    async def _story_progress(
        self,
        task: TaskRecord,
        story: Story,
        round: int,
        state: str,
        message: str,
        cause: Event[Any],
    ) -> None:
        board: Board = {
            story.key: {"status": state, "round": round, "title": story.title}
        }
        if state == "passed":
            for role in ("developer", "tester"):
                board[f"{story.key}/{role}"] = {"state": "done", "round": round}
        update = ProgressUpdate(
            task_id=task.id,
            kind="story",
            story_key=story.key,
            state=state,
            round=round,
            message=message,
        )
        await self.advance(update, cause.id, board)

    # -- ending ----------------------------------------------------------

    async def _maybe_finish(self, task: TaskRecord, cause: Event[Any]) -> None:
        """End the task once every story passed (with its design) or failed."""
        stories = await self.store.stories(task.id, task.plan_version)
        reasons = []
        for story in stories:
            state = await self.store.story(task.id, story.key)
            status = state.get("status")
            if status == "failed":
                reasons.append(state.get("reason") or f"story {story.key} failed")
            elif status != "passed" or (story.needs_design and "design" not in state):
                return
        if reasons:
            await self.end_task(task.id, "failed", "; ".join(reasons), cause.id)
        else:
            await self.end_task(task.id, "completed", None, cause.id)

    async def _after_task(self, ended: TaskEnded, event: Event[Any]) -> None:
        if ended.status == "cancelled":
            return
        task = await self.store.find(ended.task_id)
        if task is not None and await self.store.claim(task.id, "learn:end", event.id):
            await self._learn(task, ended.status, event)

    async def _learn(self, task: TaskRecord, status: str, cause: Event[Any]) -> None:
        """Run the analyser on the task's outcome so far; store new prompt versions."""
        try:
            outcome = await build_outcome(self.store, task, status)
            versions = await improve_prompts(self.crew.prompts, self.analyser, outcome)
        except HivebusError as exc:
            logger.warning("prompt analysis failed task=%s error=%s", task.id, exc)
            return
        for version in versions:
            change = {
                "role": version.role,
                "version": version.version,
                "reason": version.reason,
                "triggers": list(version.triggers),
                "after": "task" if status != "running" else "failed test round",
                "cause": cause.id,
            }
            await self.store.record_prompt_change(task.id, change)
            logger.info(
                "prompt improved task=%s role=%s version=%d",
                task.id,
                version.role,
                version.version,
            )

    # -- status and dead letters -----------------------------------------

    async def on_status(self, event: Event[AgentStatus]) -> None:
        """Turn an agent's status into a board change and a progress update."""
        status = event.data
        unit = f"{status.story_key or 'plan'}/{status.role}"
        board: Board = {
            unit: {
                "state": status.state,
                "round": status.round,
                "worker": status.worker,
            }
        }
        text = f"{status.role} {status.state}"
        if status.story_key:
            text += f" on {status.story_key} (round {status.round})"
        if status.detail:
            text += f": {status.detail}"
        update = ProgressUpdate(
            task_id=status.task_id,
            kind="role",
            role=status.role,
            story_key=status.story_key,
            state=status.state,
            round=status.round,
            message=text,
        )
        await self.advance(update, event.id, board)

    async def on_dead_letter(self, event: Event[Any]) -> None:
        """Fail the task of a dead-lettered team event instead of leaving it running."""
        data = event.data if isinstance(event.data, dict) else {}
        task_id = event.correlationid
        if not task_id or not str(data.get("event_type", "")).startswith("team."):
            return
        task = await self.store.find(task_id)
        if task is None or task.ended:
            return
        reason = (
            f"a {data.get('event_type')} event on {data.get('channel')} was "
            f"dead-lettered ({data.get('reason')}); see `hivebus dlq show "
            f"{data.get('dead_letter_id')}`"
        )
        await self.store.record_dead_letter(task_id, data)
        await self.end_task(task_id, "failed", reason, event.id)
