"""The master: plans a task, assigns its stories, judges test rounds and ends it.

Flow of one task:

1. ``team.task.submitted``: plan (brain -> ``Plan``), publish the planning
   event for the project manager.
2. ``team.story.created``: collect the plan's stories. When the last one is
   in, wait for approval (``--approve-plan``) or assign: implementation to
   the developer, design to the UX designer for stories that need one.
3. ``team.implementation.done``: send the implementation to the tester.
4. ``team.test.reported``: a pass ends the story. A failure runs the prompt
   analyser, then sends the findings back to the developer, up to the task's
   ``max_test_rounds`` rounds (the first included); after the last failed
   round the story fails.
5. When every story has ended, the task ends: ``completed`` if all passed,
   else ``failed`` with a reason naming each failed story. After the end the
   analyser runs once more on the whole outcome.

Round counts, plans and step owners live in Redis (``TaskStore``), so a
master that restarts neither re-plans nor resets a round. Agent status
events become progress updates on the task's progress stream.
"""

from __future__ import annotations

import logging
from typing import Any

from hivebus.errors import BrainError, HivebusError
from hivebus.events import Event
from hivebus.subscription import Delivery
from hivebus.team.agents import Member, TaskStopped
from hivebus.team.analyser import Analyser, RuleAnalyser, improve_prompts
from hivebus.team.brain import CONTEXT, FEEDBACK, TASK
from hivebus.team.learning import build_outcome
from hivebus.team.models import (
    PLANNING_CHANNEL,
    AgentStatus,
    Assignment,
    DesignDone,
    ImplementationDone,
    PlanApproved,
    PlanCreated,
    PlanRejected,
    ProgressUpdate,
    StoryCreated,
    TaskEnded,
    TaskSubmitted,
    TestReported,
    WorkerRole,
    WorkFailed,
    work_channel,
)
from hivebus.team.progress import Board
from hivebus.team.state import TaskRecord, now_ms
from hivebus.team.work import Finding, Implementation, Plan, Role, Story

logger = logging.getLogger(__name__)

DAY = 24 * 60 * 60


class Master(Member):
    """The master role: one instance per process, any number of processes."""

    role: Role = "master"

    def __init__(
        self,
        crew: Any,
        *,
        analyser: Analyser | None = None,
        approval_timeout: float = DAY,
    ) -> None:
        super().__init__(crew)
        self.analyser = analyser or RuleAnalyser()
        self.approval_timeout = approval_timeout

    # -- planning --------------------------------------------------------

    async def on_submitted(
        self, event: Event[TaskSubmitted], delivery: Delivery
    ) -> None:
        """Plan a submitted task (version 1) and hand the plan to the pm."""
        submitted = event.data
        if await self.store.find(submitted.task_id) is None:
            await self.store.create(submitted, event.id)
        task = await self.active_task(submitted.task_id, event)
        if task is None or not await self.store.claim(task.id, "plan:1", event.id):
            return
        try:
            await self.crew.projects.start_task(task.project, task.id, event)
        except HivebusError as exc:
            logger.warning("project context not updated task=%s error=%s", task.id, exc)
        await self._plan(task, 1, None, event, delivery)

    async def _plan(
        self,
        task: TaskRecord,
        version: int,
        comment: str | None,
        cause: Event[Any],
        delivery: Delivery,
    ) -> None:
        await self.store.update(task.id, status="planning", plan_version=version)
        await self.report(task.id, "started", cause, round=version)
        try:
            plan = await self._make_plan(task, version, comment, cause)
        except TaskStopped:
            return
        except BrainError as exc:
            await self.report(task.id, "failed", cause, round=version, detail=str(exc))
            await self.end_task(task.id, "failed", f"planning failed: {exc}", cause.id)
            return
        detail = f"plan version {version}: {len(plan.steps)} steps"
        await self.report(task.id, "done", cause, round=version, detail=detail)
        created = PlanCreated(
            task_id=task.id,
            plan_version=version,
            plan=plan,
            text=task.text,
            comment=comment,
        )

        async def publish() -> None:
            await self.emit(PLANNING_CHANNEL, created, task_id=task.id, cause=cause.id)

        await delivery.run_once(f"plan:{version}", publish)

    async def _make_plan(
        self, task: TaskRecord, version: int, comment: str | None, cause: Event[Any]
    ) -> Plan:
        stored = await self.store.plan(task.id, version)
        if stored is not None:
            return stored
        digest = await self.crew.projects.digest(task.project)
        sections = {CONTEXT: digest, TASK: task.text, FEEDBACK: comment}
        thought = await self.think(task, Plan, sections, cause=cause)
        return await self.store.save_plan(task.id, version, thought.value)

    # -- stories and approval --------------------------------------------

    async def on_story(self, event: Event[StoryCreated], delivery: Delivery) -> None:
        """Collect a plan's stories; when complete, await approval or assign them."""
        created = event.data
        task = await self.active_task(created.task_id, event)
        if task is None or task.plan_version != created.plan_version:
            return
        count = await self.store.add_story(task.id, created.plan_version, created.story)
        if count < created.total:
            return
        if not await self.store.claim(
            task.id, f"stories:{created.plan_version}", event.id
        ):
            return
        if task.approve_plan:
            await self._await_approval(task, created.plan_version, count, event)
        else:
            await self._start(task, created.plan_version, event, delivery)

    async def _await_approval(
        self, task: TaskRecord, version: int, count: int, cause: Event[Any]
    ) -> None:
        deadline = now_ms() + int(self.approval_timeout * 1000)
        await self.store.update(
            task.id,
            status="awaiting_approval",
            approval="pending",
            approval_deadline_ms=deadline,
            awaiting_since_ms=now_ms(),
            awaiting_event=cause.id,
        )
        await self.bus.client.zadd(self.bus.keys.tasks_awaiting, {task.id: deadline})
        message = (
            f"plan version {version} with {count} stories awaits approval: "
            f"hivebus tasks approve {task.id}"
        )
        await self.advance(
            ProgressUpdate(task_id=task.id, kind="task", message=message), cause.id
        )

    async def on_control(self, event: Event[Any], delivery: Delivery) -> None:
        """Start an approved plan, or plan again after a rejection."""
        decision = event.data
        task = await self.active_task(decision.task_id, event)
        if task is None or task.plan_version != decision.plan_version:
            return
        version = decision.plan_version
        if isinstance(decision, PlanApproved):
            if task.approval == "approved" and await self.store.claim(
                task.id, f"start:{version}", event.id
            ):
                await self._start(task, version, event, delivery)
        elif isinstance(decision, PlanRejected) and await self.store.claim(
            task.id, f"replan:{version}", event.id
        ):
            await self._plan(task, version + 1, decision.comment, event, delivery)

    async def expire_approvals(self) -> int:
        """End every task whose plan waited past its deadline; return how many."""
        key = self.bus.keys.tasks_awaiting
        due = await self.bus.client.zrangebyscore(key, "-inf", now_ms())
        expired = 0
        for raw in due:
            task_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            task = await self.store.find(task_id)
            if task is not None and task.status == "awaiting_approval":
                waited = (now_ms() - task.awaiting_since_ms) / 1000
                reason = f"approval timed out: the plan waited {waited:.0f}s"
                cause = task.awaiting_event or task.submitted_event
                if await self.end_task(
                    task_id, "failed", reason, cause, expect_status="awaiting_approval"
                ):
                    expired += 1
            await self.bus.client.zrem(key, task_id)
        return expired

    # -- assignments -----------------------------------------------------

    async def _start(
        self, task: TaskRecord, version: int, cause: Event[Any], delivery: Delivery
    ) -> None:
        stories = await self.store.stories(task.id, version)
        await self.store.update(task.id, status="running")
        board: Board = {}
        for story in stories:
            await self.store.init_story(
                task.id,
                story.key,
                round=1,
                status="in_progress",
                title=story.title,
                needs_design=int(story.needs_design),
                assigned_ms=now_ms(),
                round_started_ms=now_ms(),
            )
            board.update(_story_board(story, 1, "assigned"))
            if story.needs_design:
                board[f"{story.key}/ux"] = {"state": "pending", "round": 1}
        message = f"{len(stories)} stories assigned"
        update = ProgressUpdate(task_id=task.id, kind="task", message=message)
        await self.advance(update, cause.id, board)
        for story in stories:
            await self._assign(task, story, "developer", 1, cause, delivery)
            if story.needs_design:
                await self._assign(task, story, "ux", 1, cause, delivery)

    async def _assign(
        self,
        task: TaskRecord,
        story: Story,
        role: WorkerRole,
        round: int,
        cause: Event[Any],
        delivery: Delivery,
        *,
        findings: list[Finding] | None = None,
        implementation: Implementation | None = None,
    ) -> None:
        work = Assignment(
            task_id=task.id,
            role=role,
            story=story,
            round=round,
            findings=findings or [],
            implementation=implementation,
        )

        async def publish() -> None:
            await self.emit(
                work_channel(role),
                work,
                task_id=task.id,
                cause=cause.id,
                subject=story.key,
            )

        await delivery.run_once(f"assign:{story.key}:{role}:{round}", publish)

    async def _story(self, task: TaskRecord, key: str) -> Story | None:
        for story in await self.store.stories(task.id, task.plan_version):
            if story.key == key:
                return story
        return None

    # -- results ---------------------------------------------------------

    async def on_result(self, event: Event[Any], delivery: Delivery) -> None:
        """Route a result: implementation, design, test report, failure or task end."""
        result = event.data
        if isinstance(result, TaskEnded):
            await self._after_task(result, event)
            return
        task = await self.active_task(result.task_id, event)
        if task is None:
            return
        if isinstance(result, ImplementationDone):
            await self._implemented(task, result, event, delivery)
        elif isinstance(result, DesignDone):
            await self._designed(task, result, event)
        elif isinstance(result, TestReported):
            await self._tested(task, result, event, delivery)
        elif isinstance(result, WorkFailed):
            await self._work_failed(task, result, event)

    async def _accept(
        self,
        task: TaskRecord,
        key: str,
        round: int | None,
        name: str,
        event: Event[Any],
    ) -> dict[str, str] | None:
        """Return the story's state if ``event`` is its current, first result."""
        state = await self.store.story(task.id, key)
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
        reason = (
            f"story {key} ({story.title}) failed its tests in all {round} of "
            f"{task.max_test_rounds} rounds; last finding: {first}"
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
        await self.store.set_story(
            task.id, story.key, round=following, round_started_ms=now_ms()
        )
        message = (
            f"{story.key} failed round {round} with {len(findings)} finding(s); "
            f"back to the developer for round {following} of {task.max_test_rounds}"
        )
        board = _story_board(story, following, "in_progress")
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
        if (
            await self._accept(
                task, key, None, f"failed:{failed.role}:{failed.round}", event
            )
            is None
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
        """Fail the task whose event was dead-lettered, so it never hangs as running."""
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


def _story_board(story: Story, round: int, status: str) -> Board:
    return {
        story.key: {"status": status, "round": round, "title": story.title},
        f"{story.key}/developer": {"state": "pending", "round": round},
        f"{story.key}/tester": {"state": "pending", "round": round},
    }
