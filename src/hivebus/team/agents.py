"""The project manager and the workers (developer, UX designer, tester).

A worker takes a lease on its work item (story, role, round) before asking
its brain, so a duplicate assignment is skipped while another live worker
has the lease. When a worker dies, a live peer claims its stream entry
after the claim timeout. The lease records the entry id, so that peer
takes the lease over at once.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from pydantic import BaseModel

from hivebus.errors import BrainError
from hivebus.events import Event
from hivebus.subscription import Delivery
from hivebus.team.brain import (
    DESIGN,
    FEEDBACK,
    FINDINGS,
    IMPLEMENTATION,
    PLAN,
    STORY,
    TASK,
)
from hivebus.team.member import Crew, Member, ModelT, Sections, TaskStopped
from hivebus.team.models import (
    RESULTS_CHANNEL,
    STORIES_CHANNEL,
    Assignment,
    DesignDone,
    ImplementationDone,
    PlanCreated,
    StoryCreated,
    TestReported,
    WorkerRole,
    WorkFailed,
)
from hivebus.team.state import TaskRecord
from hivebus.team.work import Design, Implementation, Role, Story, StoryList, TestReport

logger = logging.getLogger(__name__)


class ProjectManager(Member):
    """Turns a plan into stories with acceptance criteria."""

    role: Role = "pm"

    async def on_plan(self, event: Event[PlanCreated], delivery: Delivery) -> None:
        """Write the stories of a plan version and publish one event per story."""
        created = event.data
        task = await self.active_task(created.task_id, event)
        if task is None or task.plan_version != created.plan_version:
            return
        if not await self.store.claim(task.id, f"pm:{created.plan_version}", event.id):
            return
        version = created.plan_version
        await self.report(task.id, "started", event, round=version)
        try:
            stories = await self._stories(task, created, event)
        except TaskStopped:
            return
        except BrainError as exc:
            await self.report(task.id, "failed", event, round=version, detail=str(exc))
            failed = WorkFailed(task_id=task.id, role="pm", reason=str(exc))
            await self.emit(RESULTS_CHANNEL, failed, task_id=task.id, cause=event.id)
            return
        for index, story in enumerate(stories):
            payload = StoryCreated(
                task_id=task.id,
                plan_version=created.plan_version,
                story=story,
                index=index,
                total=len(stories),
            )
            publish = functools.partial(
                self.emit,
                STORIES_CHANNEL,
                payload,
                task_id=task.id,
                cause=event.id,
                subject=story.key,
            )
            await delivery.run_once(f"story:{index}", publish)
        summary = {"summary": created.plan.summary, "stories": _titles(stories)}
        await self.record_context(task, "planning", "plan", summary, event)
        detail = f"{len(stories)} stories"
        await self.report(task.id, "done", event, round=version, detail=detail)

    async def _stories(
        self, task: TaskRecord, created: PlanCreated, event: Event[Any]
    ) -> list[Story]:
        name = f"{created.plan_version}:stories"
        kept = await self.store.kept(task.id, "plans", name)
        if kept is None:
            sections = {
                TASK: created.text,
                PLAN: created.plan,
                FEEDBACK: created.comment,
            }
            thought = await self.think(task, StoryList, sections, cause=event)
            kept = await self.store.keep(
                task.id, "plans", name, thought.value.model_dump_json()
            )
        return _numbered(StoryList.model_validate_json(kept).stories)


class Worker(Member):
    """A developer, UX designer or tester: one assignment at a time per work item."""

    def __init__(self, crew: Crew, role: WorkerRole) -> None:
        super().__init__(crew)
        self.role = role

    async def on_assignment(self, event: Event[Assignment], delivery: Delivery) -> None:
        """Do one assignment and publish the result, unless it is stale or taken."""
        work = event.data
        task = await self.active_task(work.task_id, event)
        if task is None or not await self._current(task, work, event):
            return
        item = f"{work.story.key}:{self.role}:{work.round}"
        async with self.leased(task.id, item, delivery) as held:
            if held:
                await self._do(task, work, event)

    async def _current(
        self, task: TaskRecord, work: Assignment, event: Event[Any]
    ) -> bool:
        state = await self.store.story(task.id, work.story.key)
        reason = None
        status = state.get("status")
        # A story may pass its tests before its design is done, and it
        # completes only with the design, so the designer still works on it.
        if status == "failed" or (status == "passed" and self.role != "ux"):
            reason = f"story {status}"
        elif self.role == "ux" and "design" in state:
            reason = "design already accepted"
        elif self.role != "ux" and state.get("round") != str(work.round):
            reason = f"story is in round {state.get('round')}"
        elif f"done:{self.role}:{work.round}" in state:
            reason = "already done"
        if reason is not None:
            logger.info(
                "assignment skipped task=%s story=%s role=%s round=%d reason=%s "
                "event_id=%s",
                task.id,
                work.story.key,
                self.role,
                work.round,
                reason,
                event.id,
            )
        return reason is None

    async def _do(self, task: TaskRecord, work: Assignment, event: Event[Any]) -> None:
        key = work.story.key
        await self.report(task.id, "started", event, story_key=key, round=work.round)
        try:
            result = await self._work(task, work, event)
        except TaskStopped:
            return
        except BrainError as exc:
            await self._failed(task, work, event, exc)
            return
        if await self.active_task(task.id, event) is None:
            return
        await self._record(task, work, result, event)
        # The status goes first, so that the master usually receives "done"
        # before the result that may end the task: updates after the end
        # are dropped.
        await self.report(task.id, "done", event, story_key=key, round=work.round)
        out = await self.emit(
            RESULTS_CHANNEL, result, task_id=task.id, cause=event.id, subject=key
        )
        await self.store.set_story(
            task.id, key, **{f"done:{self.role}:{work.round}": out.id}
        )

    async def _work(
        self, task: TaskRecord, work: Assignment, event: Event[Any]
    ) -> BaseModel:
        story = work.story
        if self.role == "developer":
            state = await self.store.story(task.id, story.key)
            sections = {
                TASK: task.text,
                STORY: story,
                DESIGN: state.get("design_json"),
                FINDINGS: work.findings or None,
            }
            made = await self._think(task, Implementation, sections, event, story.key)
            implementation = made.model_copy(update={"story_key": story.key})
            return ImplementationDone(
                task_id=task.id,
                story_key=story.key,
                round=work.round,
                implementation=implementation,
            )
        if self.role == "ux":
            sections = {TASK: task.text, STORY: story}
            design = await self._think(task, Design, sections, event, story.key)
            return DesignDone(
                task_id=task.id,
                story_key=story.key,
                design=design.model_copy(update={"story_key": story.key}),
            )
        sections = {TASK: task.text, STORY: story, IMPLEMENTATION: work.implementation}
        report = await self._think(task, TestReport, sections, event, story.key)
        return TestReported(
            task_id=task.id,
            story_key=story.key,
            round=work.round,
            report=report.model_copy(update={"story_key": story.key}),
        )

    async def _think(
        self,
        task: TaskRecord,
        schema: type[ModelT],
        sections: Sections,
        event: Event[Any],
        story_key: str,
    ) -> ModelT:
        thought = await self.think(
            task, schema, sections, cause=event, story_key=story_key
        )
        return thought.value

    async def _failed(
        self, task: TaskRecord, work: Assignment, event: Event[Any], exc: BrainError
    ) -> None:
        key = work.story.key
        logger.warning(
            "brain returned no valid reply task=%s story=%s role=%s round=%d error=%s",
            task.id,
            key,
            self.role,
            work.round,
            exc,
        )
        await self.report(
            task.id, "failed", event, story_key=key, round=work.round, detail=str(exc)
        )
        failed = WorkFailed(
            task_id=task.id,
            role=self.role,
            story_key=key,
            round=work.round,
            reason=str(exc),
        )
        await self.emit(RESULTS_CHANNEL, failed, task_id=task.id, cause=event.id)

    async def _record(
        self, task: TaskRecord, work: Assignment, result: BaseModel, event: Event[Any]
    ) -> None:
        key = work.story.key
        if isinstance(result, ImplementationDone):
            made = result.implementation
            value = {"round": work.round, "summary": made.summary, "files": made.files}
            await self.record_context(task, "implementation", key, value, event)
        elif isinstance(result, DesignDone):
            value = {"summary": result.design.summary, "screens": result.design.screens}
            await self.record_context(task, "design", key, value, event)
        elif isinstance(result, TestReported):
            report = result.report
            value = {
                "round": work.round,
                "passed": report.passed,
                "findings": [finding.criterion for finding in report.findings],
            }
            await self.record_context(task, "test_results", key, value, event)


def _numbered(stories: list[Story]) -> list[Story]:
    """Return the stories keyed S1, S2, ... in order, whatever keys the brain gave."""
    return [
        story.model_copy(update={"key": f"S{index}"})
        for index, story in enumerate(stories, 1)
    ]


def _titles(stories: list[Story]) -> list[str]:
    return [f"{story.key}: {story.title}" for story in stories]
