"""What every role of the team shares: publishing, status, brain calls, task ends.

A member publishes every event with the task id as correlation id and the
id of the event it handles as causation id, and records each one in the
task's event tree. Before each brain call it reads the role's current
prompt version, so that a new version is used from the next call on, in
every process. It also checks that the task is still running and within
its token budget, and afterwards adds the call's usage to the task's
totals.
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
from hivebus.errors import BrainError, BrainServerError, BreakerOpenError, ContextError
from hivebus.events import Event
from hivebus.subscription import Delivery
from hivebus.team.brain import (
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
    STATUS_CHANNEL,
    AgentStatus,
    ProgressUpdate,
)
from hivebus.team.progress import Board, ProgressLog
from hivebus.team.project import ProjectContexts, Section
from hivebus.team.prompts import PromptStore
from hivebus.team.state import TaskRecord, TaskStore, now_ms
from hivebus.team.work import Role

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)
Sections = Mapping[str, Any]


class TaskStopped(Exception):
    """The task ended (cancelled, failed, out of budget): drop this piece of work."""


@dataclass(slots=True)
class Crew:
    """The services that every member of one process shares: bus, stores, brain."""

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
        and ``BrainError`` when the brain returned no valid reply or its
        circuit breaker rejected the call.
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
        except BreakerOpenError as exc:
            # Fail this piece of work like a call whose requests all failed.
            # Waiting out cool-downs would hold the task for minutes and then
            # dead-letter it with a reason that names neither server nor role.
            error = self._breaker_error(exc)
            await self._count_failure(task, ask, error, started, cause)
            raise error from exc
        except BrainError as exc:
            await self._count_failure(task, ask, exc, started, cause)
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

    def _breaker_error(self, exc: BreakerOpenError) -> BrainServerError:
        msg = (
            f"role {self.role} did not call brain {self.crew.brain.name}: {exc}. "
            "The breaker opens after repeated failures of the model server or "
            "a spent quota; check the server and the account, then submit the "
            "task again"
        )
        return BrainServerError(msg)

    async def _count_failure(
        self,
        task: TaskRecord,
        ask: Ask[Any],
        exc: BrainError,
        started: float,
        cause: Event[Any],
    ) -> None:
        """Record a failed call: the tokens it spent and the replies it rejected."""
        usage = exc.usage or Usage()
        replies = len(exc.rejections)  # every reply received was rejected
        call = _call(ask, usage, replies, exc.rejections, (), started)
        await self._count(task, call, usage, replies, cause, str(exc))

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
                "duplicate assignment skipped, another worker has the lease task=%s "
                "item=%s holder=%s",
                task_id,
                item,
                other.get("worker"),
            )
            yield False
            return
        # Stopped by an event rather than by cancellation: redis-py 8.2 can
        # swallow a cancel that lands during a command, which would leave
        # this loop running and the ``finally`` below waiting on it.
        done = asyncio.Event()
        renewal = asyncio.create_task(self._renew(task_id, item, holder, done))
        try:
            yield True
        finally:
            done.set()
            await asyncio.gather(renewal, return_exceptions=True)
            await asyncio.shield(self.store.release(task_id, item))

    async def _renew(
        self, task_id: str, item: str, holder: dict[str, Any], done: asyncio.Event
    ) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=holder["ttl_ms"] / 3000)
            if not done.is_set():
                await self.store.renew_lease(task_id, item, holder)


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
