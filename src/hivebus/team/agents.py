"""The team's members: what every role shares, the project manager and the workers.

A member publishes every event with the task id as correlation id and the
id of the event it handles as causation id, and records each one in the
task's event tree. Before each brain call it reads the role's current
prompt version, checks that the task is still running and within its token
budget, and afterwards adds the call's usage to the task's totals.

The developer, UX designer and tester are ``Worker``s. A worker takes a
lease on its work item (story, role, round) before asking its brain, so a
duplicate assignment is skipped while another live worker holds the item.
When a worker dies, its stream entry is claimed by a live peer after the
claim timeout; the lease records the entry id, so that peer takes the
lease over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from hivebus.bus import Bus
from hivebus.errors import BrainError, ContextError
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
    Ask,
    Brain,
    Rejection,
    Thought,
    Usage,
    compose_prompt,
)
from hivebus.team.client import finish_task, publish_for_task
from hivebus.team.models import (
    PROGRESS_CHANNEL,
    RESULTS_CHANNEL,
    STATUS_CHANNEL,
    STORIES_CHANNEL,
    AgentStatus,
    Assignment,
    DesignDone,
    ImplementationDone,
    PlanCreated,
    ProgressUpdate,
    StoryCreated,
    TestReported,
    WorkerRole,
    WorkFailed,
)
from hivebus.team.progress import Board, ProgressLog
from hivebus.team.project import ProjectContexts, Section
from hivebus.team.prompts import PromptStore
from hivebus.team.state import TaskRecord, TaskStore, now_ms
from hivebus.team.work import Design, Implementation, Role, Story, StoryList, TestReport

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)
Sections = Mapping[str, Any]


class TaskStopped(Exception):
    """The task ended (cancelled, failed, out of budget): drop this piece of work."""


@dataclass(slots=True)
class Crew:
    """What every member of one process shares: the bus, stores and the brain."""

    bus: Bus
    store: TaskStore
    progress: ProgressLog
    prompts: PromptStore
    projects: ProjectContexts
    brain: Brain
    lease_seconds: float = 30.0


class Member:
    """A role of the team: publishing, status, brain calls and task ends."""

    role: Role = "master"

    def __init__(self, crew: Crew) -> None:
        self.crew = crew
        self.bus = crew.bus
        self.store = crew.store

    # -- events ----------------------------------------------------------

    async def emit(
        self,
        channel: str,
        data: BaseModel,
        *,
        task_id: str,
        cause: str | None,
        durable: bool = True,
        subject: str | None = None,
    ) -> Event[Any]:
        """Publish ``data`` for a task, caused by event ``cause``, and record it."""
        return await publish_for_task(
            self.bus,
            self.store,
            channel,
            data,
            task_id=task_id,
            cause=cause,
            durable=durable,
            subject=subject,
        )

    async def report(
        self,
        task_id: str,
        state: str,
        cause: Event[Any],
        *,
        story_key: str | None = None,
        round: int = 1,
        detail: str = "",
    ) -> None:
        """Publish this role's status (started, progress, done, failed) for a task."""
        status = AgentStatus(
            task_id=task_id,
            role=self.role,
            state=state,
            story_key=story_key,
            round=round,
            worker=self.bus.process_id,
            detail=detail[:500],
        )
        await self.emit(
            STATUS_CHANNEL, status, task_id=task_id, cause=cause.id, subject=story_key
        )

    async def advance(
        self, update: ProgressUpdate, cause: str, board: Board | None = None
    ) -> ProgressUpdate | None:
        """Append a progress update (and board changes) and broadcast it."""
        entry = await self.crew.progress.update(update.model_copy(), board)
        if entry is not None:
            await self.emit(
                PROGRESS_CHANNEL,
                entry.model_copy(update={"cause": cause}),
                task_id=update.task_id,
                cause=cause,
                durable=False,
            )
        return entry

    async def end_task(
        self,
        task_id: str,
        status: str,
        reason: str | None,
        cause: str,
        *,
        expect_status: str | None = None,
    ) -> ProgressUpdate | None:
        """End a task once; return the final update if this call (or cause) ended it."""
        return await finish_task(
            self.bus,
            self.store,
            self.crew.progress,
            task_id,
            status,
            reason,
            cause,
            expect_status=expect_status,
        )

    # -- tasks and brains ------------------------------------------------

    async def active_task(self, task_id: str, event: Event[Any]) -> TaskRecord | None:
        """Return the task if it is still running, else log why the event is skipped."""
        task = await self.store.find(task_id)
        if task is None or task.ended:
            logger.info(
                "event skipped, task not running task=%s status=%s event_id=%s "
                "type=%s role=%s",
                task_id,
                task.status if task else "unknown",
                event.id,
                event.type,
                self.role,
            )
            return None
        return task

    async def think(
        self,
        task: TaskRecord,
        schema: type[ModelT],
        sections: Sections,
        *,
        cause: Event[Any],
        story_key: str | None = None,
    ) -> Thought[ModelT]:
        """Ask the brain for ``schema`` with the role's current prompt; count the cost.

        Raises ``TaskStopped`` when the task ended or its budget is spent,
        and ``BrainError`` when the brain gave no usable answer.
        """
        await self._check_running(task, cause)
        prompt = await self.crew.prompts.current(self.role)
        ask = Ask(
            role=self.role,
            system=prompt.text,
            prompt=compose_prompt(sections),
            schema=schema,
            task_id=task.id,
            story_key=story_key,
            prompt_version=prompt.version,
        )
        started = time.monotonic()
        try:
            thought = await self.crew.brain.think(ask)
        except BrainError as exc:
            call = _call(ask, exc.usage or Usage(), 1, exc.rejections, (), started)
            await self._count(task, call, exc.usage or Usage(), 1, cause, str(exc))
            raise
        call = _call(
            ask,
            thought.usage,
            thought.calls,
            thought.rejections,
            thought.notes,
            started,
        )
        await self._count(task, call, thought.usage, thought.calls, cause)
        return thought

    async def _check_running(self, task: TaskRecord, cause: Event[Any]) -> None:
        current = await self.store.find(task.id)
        if current is None or current.ended:
            msg = f"task {task.id} is {current.status if current else 'gone'}"
            raise TaskStopped(msg)
        spent = await self.store.total_tokens(task.id)
        if task.token_budget is not None and spent >= task.token_budget:
            await self._stop_for_budget(task, spent, cause)

    async def _count(
        self,
        task: TaskRecord,
        call: dict[str, Any],
        usage: Usage,
        calls: int,
        cause: Event[Any],
        error: str | None = None,
    ) -> None:
        if error is not None:
            call["error"] = error[:500]
        total = await self.store.add_usage(task.id, self.role, usage, calls)
        await self.store.record_call(task.id, {**call, "task_total": total})
        if task.token_budget is not None and total >= task.token_budget:
            await self._stop_for_budget(task, total, cause)

    async def _stop_for_budget(
        self, task: TaskRecord, spent: int, cause: Event[Any]
    ) -> None:
        reason = (
            f"token budget spent: the task used {spent} tokens of its budget of "
            f"{task.token_budget}"
        )
        await self.end_task(task.id, "failed", reason, cause.id)
        raise TaskStopped(reason)

    async def record_context(
        self,
        task: TaskRecord,
        section: Section,
        item: str,
        value: dict[str, Any],
        cause: Event[Any],
    ) -> None:
        """Update this role's section of the project context; log a failure."""
        try:
            await self.crew.projects.record(
                task.project, section, task.id, item, value, cause
            )
        except ContextError as exc:
            logger.warning(
                "project context not updated task=%s section=%s item=%s error=%s",
                task.id,
                section,
                item,
                exc,
            )

    @contextlib.asynccontextmanager
    async def leased(
        self, task_id: str, item: str, delivery: Delivery
    ) -> AsyncIterator[bool]:
        """Hold the lease on a work item while the block runs; yield False if taken."""
        ttl_ms = max(1000, int(self.crew.lease_seconds * 1000))
        holder = {
            "entry": delivery.entry_id,
            "worker": self.bus.process_id,
            "since_ms": now_ms(),
            "ttl_ms": ttl_ms,
        }
        other = await self.store.lease(task_id, item, holder)
        if other is not None:
            logger.info(
                "duplicate assignment skipped, another worker holds it task=%s "
                "item=%s holder=%s",
                task_id,
                item,
                other.get("worker"),
            )
            yield False
            return
        renewal = asyncio.create_task(self._renew(task_id, item, holder))
        try:
            yield True
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
            await asyncio.shield(self.store.release(task_id, item))

    async def _renew(self, task_id: str, item: str, holder: dict[str, Any]) -> None:
        while True:
            await asyncio.sleep(holder["ttl_ms"] / 3000)
            await self.store.renew_lease(task_id, item, holder)


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
        await self.report(task.id, "started", event)
        try:
            stories = await self._stories(task, created, event)
        except TaskStopped:
            return
        except BrainError as exc:
            await self.report(task.id, "failed", event, detail=str(exc))
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
            await delivery.run_once(
                f"story:{index}",
                lambda p=payload: self.emit(  # type: ignore[misc]
                    STORIES_CHANNEL,
                    p,
                    task_id=task.id,
                    cause=event.id,
                    subject=p.story.key,
                ),
            )
        summary = {"summary": created.plan.summary, "stories": _titles(stories)}
        await self.record_context(task, "planning", "plan", summary, event)
        await self.report(task.id, "done", event, detail=f"{len(stories)} stories")

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
        if state.get("status") in ("passed", "failed"):
            reason = f"story {state['status']}"
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
        # The status goes first, so the master usually sees "done" before the
        # result that may end the task; updates after the end are dropped.
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
            "brain gave no usable answer task=%s story=%s role=%s round=%d error=%s",
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


def _call(
    ask: Any,
    usage: Usage,
    calls: int,
    rejections: tuple[Rejection, ...],
    notes: tuple[str, ...],
    started: float,
) -> dict[str, Any]:
    """Return the record of one brain call, as stored with the task."""
    return {
        "role": ask.role,
        "story": ask.story_key,
        "prompt_version": ask.prompt_version,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "estimated": usage.estimated,
        "calls": calls,
        "rejections": [{"kind": r.kind, "detail": r.detail[:300]} for r in rejections],
        "notes": list(notes),
        "seconds": round(time.monotonic() - started, 3),
        "time_ms": now_ms(),
    }
