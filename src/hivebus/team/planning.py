"""Planning and dispatch: the master's first half of a task.

1. ``team.task.submitted``: plan (brain -> ``Plan``) and publish the
   planning event for the project manager.
2. ``team.story.created``: collect the plan's stories. When the last one is
   in, wait for approval (``--approve-plan``) or assign them: implementation
   to the developer, design to the UX designer for stories that need one.
3. ``team.plan.approved`` starts the plan version it names, once;
   ``team.plan.rejected`` plans again with the person's comment, and the
   revised plan waits for approval again.

A plan waiting for approval is state in Redis (status, plan version,
deadline), so a master that restarts neither re-plans nor assigns twice.
A plan that waits past ``approval_timeout`` fails the task with the reason
"approval timed out".
"""

from __future__ import annotations

import logging
from typing import Any

from hivebus.errors import BrainError, HivebusError
from hivebus.events import Event
from hivebus.subscription import Delivery
from hivebus.team.brain import CONTEXT, FEEDBACK, TASK
from hivebus.team.member import Crew, Member, TaskStopped
from hivebus.team.models import (
    PLANNING_CHANNEL,
    Assignment,
    PlanApproved,
    PlanCreated,
    PlanRejected,
    ProgressUpdate,
    StoryCreated,
    TaskSubmitted,
    WorkerRole,
    work_channel,
)
from hivebus.team.progress import Board
from hivebus.team.state import TaskRecord, now_ms
from hivebus.team.wording import plural
from hivebus.team.work import Finding, Implementation, Plan, Role, Story

logger = logging.getLogger(__name__)

DAY = 24 * 60 * 60


class Planner(Member):
    """The master's planning, approval and assignment steps."""

    role: Role = "master"

    def __init__(self, crew: Crew, *, approval_timeout: float = DAY) -> None:
        super().__init__(crew)
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
        def not_planned(current: TaskRecord) -> bool:
            if current.plan_version != version:
                return current.plan_version < version
            return current.status in ("submitted", "planning")

        if not await self.store.update(
            task.id, when=not_planned, status="planning", plan_version=version
        ):
            logger.info(
                "planning step repeated, state kept task=%s plan_version=%d",
                task.id,
                version,
            )
        await self.report(task.id, "started", cause, round=version)
        try:
            plan = await self._make_plan(task, version, comment, cause)
        except TaskStopped:
            return
        except BrainError as exc:
            await self.report(task.id, "failed", cause, round=version, detail=str(exc))
            await self.end_task(task.id, "failed", f"planning failed: {exc}", cause.id)
            return
        detail = f"plan version {version}: {plural(len(plan.steps), 'step')}"
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

        def undecided(current: TaskRecord) -> bool:
            decided = current.approval in ("approved", "rejected")
            return current.plan_version == version and not (
                decided and current.approval_version == version
            )

        if not await self.store.update(
            task.id,
            when=undecided,
            status="awaiting_approval",
            approval="pending",
            approval_deadline_ms=deadline,
            awaiting_since_ms=now_ms(),
            awaiting_event=cause.id,
        ):
            return
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
            board.update(story_board(story, 1, "assigned"))
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


def story_board(story: Story, round: int, status: str) -> Board:
    """Return the board fields of a story starting a round: its status and roles."""
    return {
        story.key: {"status": status, "round": round, "title": story.title},
        f"{story.key}/developer": {"state": "pending", "round": round},
        f"{story.key}/tester": {"state": "pending", "round": round},
    }
