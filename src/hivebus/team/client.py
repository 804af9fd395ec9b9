"""What a client does with team tasks: submit, follow, approve, reject, cancel, show.

None of these needs a running team. A task submitted while no master runs
waits in the ``team.tasks`` stream. Approving, rejecting and cancelling
change the task's state in Redis in one transaction, so that two decisions
made at once cannot both win, and then notify the master with an event.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError
from redis.exceptions import WatchError

from hivebus.bus import Bus
from hivebus.errors import TaskError, TaskNotFoundError
from hivebus.events import Event, new_event_id
from hivebus.team.models import (
    CONTROL_CHANNEL,
    END_STATES,
    PROGRESS_CHANNEL,
    RESULTS_CHANNEL,
    TASKS_CHANNEL,
    PlanApproved,
    PlanRejected,
    ProgressUpdate,
    TaskEnded,
    TaskSubmitted,
    register_types,
)
from hivebus.team.progress import ProgressLog
from hivebus.team.state import TaskRecord, TaskStore, not_found_message, now_ms

logger = logging.getLogger(__name__)

CANCEL_REASON = "cancelled by user"


async def publish_for_task(
    bus: Bus,
    store: TaskStore,
    channel: str,
    data: BaseModel,
    *,
    task_id: str,
    cause: str | None,
    durable: bool = True,
    subject: str | None = None,
) -> Event[Any]:
    """Publish ``data`` with the task's correlation id and record it in the tree."""
    event = bus.event(data, correlation_id=task_id, causation_id=cause, subject=subject)
    await bus.publish(channel, event, durable=durable)
    await store.record_event(task_id, event, channel)
    return event


async def finish_task(
    bus: Bus,
    store: TaskStore,
    log: ProgressLog,
    task_id: str,
    status: str,
    reason: str | None,
    cause: str,
    *,
    expect_status: str | None = None,
) -> ProgressUpdate | None:
    """End a task once and announce it; return the final update if this call did.

    The end state and the final progress update are written together. A
    ``team.task.ended`` event then goes to the master (durable) and the final
    update to live listeners (broadcast).
    """
    final = await log.finish(
        task_id, status, reason, cause, expect_status=expect_status
    )
    if final is None:
        return None
    await bus.client.zrem(bus.keys.tasks_awaiting, task_id)
    logger.info("task ended task=%s status=%s reason=%s", task_id, status, reason)
    await publish_for_task(
        bus, store, PROGRESS_CHANNEL, final, task_id=task_id, cause=cause, durable=False
    )
    ended = TaskEnded(task_id=task_id, status=status, reason=reason)
    await publish_for_task(
        bus, store, RESULTS_CHANNEL, ended, task_id=task_id, cause=cause
    )
    return final


class TaskClient:
    """Submit and steer team tasks on the Redis of ``bus``."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        register_types(bus.types)

    @property
    def store(self) -> TaskStore:
        """The task state store (the bus must be connected)."""
        return TaskStore(self.bus.client, self.bus.keys)

    @property
    def progress(self) -> ProgressLog:
        """The progress log (the bus must be connected)."""
        return ProgressLog(self.bus.client, self.bus.keys)

    async def submit(
        self,
        text: str,
        *,
        project: str = "default",
        approve_plan: bool = False,
        max_test_rounds: int = 2,
        token_budget: int | None = None,
    ) -> str:
        """Store a new task, hand it to the master and return its id."""
        await self.bus.connect()
        task_id = new_event_id()
        try:
            submitted = TaskSubmitted(
                task_id=task_id,
                text=text,
                project=project,
                approve_plan=approve_plan,
                max_test_rounds=max_test_rounds,
                token_budget=token_budget,
            )
        except ValidationError as exc:
            msg = f"invalid task: {_first_error(exc)}"
            raise TaskError(msg) from None
        event = self.bus.event(submitted, correlation_id=task_id, subject=task_id)
        await self.store.create(submitted, event.id)
        update = ProgressUpdate(task_id=task_id, kind="task", message="task submitted")
        await self.progress.update(update)
        await self.bus.publish(TASKS_CHANNEL, event, durable=True)
        await self.store.record_event(task_id, event, TASKS_CHANNEL)
        logger.info("task submitted task=%s project=%s", task_id, project)
        return task_id

    async def get(self, task_id: str) -> TaskRecord:
        """Return a task's record, or raise ``TaskNotFoundError``."""
        await self.bus.connect()
        return await self.store.get(task_id)

    async def list(self, limit: int = 50) -> list[TaskRecord]:
        """Return the most recent tasks, newest first."""
        await self.bus.connect()
        return await self.store.recent(limit)

    async def follow(
        self, task_id: str, after: str = "0-0"
    ) -> AsyncIterator[ProgressUpdate]:
        """Yield a task's progress after id ``after``, ending with its final update."""
        await self.bus.connect()
        async for update in self.progress.follow(task_id, after):
            yield update

    # -- approval --------------------------------------------------------

    async def approve(self, task_id: str) -> str:
        """Approve the plan a task waits on; return what happened.

        A second approval returns "already approved" and changes nothing.
        Raises ``TaskNotFoundError`` for an unknown id and ``TaskError``
        for a task that ended or is not waiting for approval.
        """
        await self.bus.connect()
        task = await self._decide(task_id, approve=True)
        if task is None:
            await self._heal_approval(task_id)
            return f"task {task_id}: plan already approved"
        decision = PlanApproved(task_id=task_id, plan_version=task.plan_version)
        await self._announce(
            task, decision, f"plan version {task.plan_version} approved"
        )
        return f"task {task_id}: plan version {task.plan_version} approved"

    async def reject(self, task_id: str, comment: str) -> str:
        """Reject the plan a task waits on; the master plans again with ``comment``."""
        if not comment.strip():
            msg = "a rejection needs a comment that says what to change: --comment TEXT"
            raise TaskError(msg)
        await self.bus.connect()
        task = await self._decide(task_id, approve=False, comment=comment)
        assert task is not None
        decision = PlanRejected(
            task_id=task_id, plan_version=task.plan_version, comment=comment
        )
        message = f"plan version {task.plan_version} rejected: {comment}"
        await self._announce(task, decision, message)
        return f"task {task_id}: plan version {task.plan_version} rejected; re-planning"

    async def _decide(
        self, task_id: str, *, approve: bool, comment: str = ""
    ) -> TaskRecord | None:
        """Move a task out of awaiting approval in one transaction."""
        key = self.bus.keys.task(task_id)
        async with self.bus.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    fields = await pipe.hgetall(key)
                    task = _record(fields, task_id)
                    if task.status in END_STATES:
                        raise TaskError(_ended_message(task, "approve or reject"))
                    if approve and task.approval == "approved":
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return None
                    _check_awaiting(task)
                    values = {
                        "approval": "approved" if approve else "rejected",
                        "approval_version": str(task.plan_version),
                        "status": "running" if approve else "planning",
                        "comment": comment,
                        "updated_ms": str(now_ms()),
                    }
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(key, mapping=values)  # type: ignore[arg-type]
                    await pipe.execute()
                    return task
                except WatchError:
                    continue

    async def _heal_approval(self, task_id: str) -> None:
        """Announce an approval again if the master has not started on it yet.

        This covers a client that died between storing its approval and
        publishing it; the master starts a plan version once, however many
        approvals it receives.
        """
        task = await self.store.get(task_id)
        started = await self.store.kept(task_id, "steps", f"start:{task.plan_version}")
        if started is None and not task.ended:
            decision = PlanApproved(task_id=task_id, plan_version=task.plan_version)
            await publish_for_task(
                self.bus,
                self.store,
                CONTROL_CHANNEL,
                decision,
                task_id=task_id,
                cause=task.awaiting_event or task.submitted_event,
            )

    async def _announce(
        self, task: TaskRecord, decision: BaseModel, message: str
    ) -> None:
        await self.bus.client.zrem(self.bus.keys.tasks_awaiting, task.id)
        update = ProgressUpdate(task_id=task.id, kind="task", message=message)
        await self.progress.update(update)
        await publish_for_task(
            self.bus,
            self.store,
            CONTROL_CHANNEL,
            decision,
            task_id=task.id,
            cause=task.awaiting_event or task.submitted_event,
        )

    # -- cancel ----------------------------------------------------------

    async def cancel(self, task_id: str) -> str:
        """End a task as cancelled, even with no worker running."""
        await self.bus.connect()
        task = await self.store.get(task_id)
        if task.ended:
            raise TaskError(_ended_message(task, "cancel"))
        final = await finish_task(
            self.bus,
            self.store,
            self.progress,
            task_id,
            "cancelled",
            CANCEL_REASON,
            task.submitted_event,
        )
        if final is None:
            raise TaskError(_ended_message(await self.store.get(task_id), "cancel"))
        return f"task {task_id}: cancelled"


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"])
    return f"`{field}`: {error['msg']} (got {error.get('input')!r})"


def _record(fields: dict[Any, Any], task_id: str) -> TaskRecord:
    decoded = {
        (k.decode() if isinstance(k, bytes) else k): (
            v.decode() if isinstance(v, bytes) else v
        )
        for k, v in fields.items()
    }
    if "id" not in decoded:
        raise TaskNotFoundError(not_found_message(task_id))
    return TaskRecord.from_hash(decoded)


def _check_awaiting(task: TaskRecord) -> None:
    if task.status in END_STATES:
        raise TaskError(_ended_message(task, "approve or reject"))
    if task.status != "awaiting_approval":
        hint = (
            "it was submitted without --approve-plan"
            if not task.approve_plan
            else "wait until `hivebus tasks show` says awaiting_approval"
        )
        msg = (
            f"task {task.id!r} is not awaiting approval (status {task.status}): {hint}"
        )
        raise TaskError(msg)


def _ended_message(task: TaskRecord, action: str) -> str:
    reason = f": {task.reason}" if task.reason else ""
    return (
        f"task {task.id!r} already ended ({task.status}{reason}); nothing to {action}"
    )
