"""Task state in Redis: the record, plans, stories, rounds and work leases.

``TaskStore`` also has the append-only records of ``TaskLedger`` (tokens,
brain calls, prompt changes, the event tree). Every key of a task shares
the hash tag ``{TASK_ID}`` (see ``Keys.task``). Nothing here lives in a
process: a master or agent that restarts reads the same state back, so a
restart never repeats a plan or resets a round count.

Handlers may race for a step, such as acting on the event that completes a
plan's stories. Such steps are claimed with ``claim``, which stores the
first claimant's event id. Only a redelivery of that same event gets the
step again, so a handler that dies after its claim finishes the step when
its event is delivered again, and no other event repeats it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import WatchError

from hivebus.errors import TaskNotFoundError
from hivebus.team.ledger import TaskLedger
from hivebus.team.models import END_STATES, TaskSubmitted
from hivebus.team.work import Plan, Story

logger = logging.getLogger(__name__)


def now_ms() -> int:
    """Return the wall-clock time in epoch milliseconds."""
    return int(time.time() * 1000)


def not_found_message(task_id: str) -> str:
    """Return the error text for a task id that has no task."""
    return (
        f"no task {task_id!r}: check the id with `hivebus tasks list`, and that "
        "--redis and --prefix match the team's"
    )


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task's state as stored in its hash."""

    id: str
    text: str
    project: str
    status: str
    reason: str
    approve_plan: bool
    max_test_rounds: int
    token_budget: int | None
    plan_version: int
    approval: str  # "", "pending", "approved" or "rejected"
    approval_version: int  # the plan version that ``approval`` is about
    comment: str
    created_ms: int
    updated_ms: int
    ended_ms: int
    submitted_event: str
    awaiting_event: str
    awaiting_since_ms: int
    approval_deadline_ms: int

    @property
    def ended(self) -> bool:
        """Whether the task reached an end state."""
        return self.status in END_STATES

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> TaskRecord:
        """Build a record from the decoded fields of the task hash."""
        budget = fields.get("token_budget", "")
        return cls(
            id=fields["id"],
            text=fields.get("text", ""),
            project=fields.get("project", "default"),
            status=fields.get("status", "submitted"),
            reason=fields.get("reason", ""),
            approve_plan=fields.get("approve_plan") == "1",
            max_test_rounds=int(fields.get("max_test_rounds", "2")),
            token_budget=int(budget) if budget else None,
            plan_version=int(fields.get("plan_version", "0")),
            approval=fields.get("approval", ""),
            approval_version=int(fields.get("approval_version", "0")),
            comment=fields.get("comment", ""),
            created_ms=int(fields.get("created_ms", "0")),
            updated_ms=int(fields.get("updated_ms", "0")),
            ended_ms=int(fields.get("ended_ms", "0")),
            submitted_event=fields.get("submitted_event", ""),
            awaiting_event=fields.get("awaiting_event", ""),
            awaiting_since_ms=int(fields.get("awaiting_since_ms", "0")),
            approval_deadline_ms=int(fields.get("approval_deadline_ms", "0")),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the record as plain JSON values."""
        return {name: getattr(self, name) for name in self.__slots__}


class TaskStore(TaskLedger):
    """Read and change team tasks in Redis under one key prefix."""

    # -- the task record -------------------------------------------------

    async def create(self, submitted: TaskSubmitted, event_id: str) -> bool:
        """Store a new task; return False if the id is taken (nothing changes)."""
        created = now_ms()
        fields = {
            "id": submitted.task_id,
            "text": submitted.text,
            "project": submitted.project,
            "status": "submitted",
            "approve_plan": "1" if submitted.approve_plan else "0",
            "max_test_rounds": str(submitted.max_test_rounds),
            "token_budget": str(submitted.token_budget or ""),
            "plan_version": "0",
            "created_ms": str(created),
            "updated_ms": str(created),
            "submitted_event": event_id,
        }
        key = self.key(submitted.task_id)
        async with self.client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if await pipe.exists(key):
                    await pipe.reset()  # type: ignore[no-untyped-call]
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                await pipe.execute()
            except WatchError:
                return False
        await self.client.zadd(self.keys.tasks, {submitted.task_id: created})
        return True

    async def find(self, task_id: str) -> TaskRecord | None:
        """Return the task, or None if there is no task with that id."""
        fields = _decode(await self.client.hgetall(self.key(task_id)))
        if "id" not in fields:
            return None
        return TaskRecord.from_hash(fields)

    async def get(self, task_id: str) -> TaskRecord:
        """Return the task, or raise ``TaskNotFoundError`` naming the id."""
        task = await self.find(task_id)
        if task is None:
            raise TaskNotFoundError(not_found_message(task_id))
        return task

    async def recent(self, limit: int = 50) -> list[TaskRecord]:
        """Return the most recently submitted tasks, newest first."""
        ids = await self.client.zrevrange(self.keys.tasks, 0, max(0, limit - 1))
        records = [await self.find(_text(task_id)) for task_id in ids]
        return [record for record in records if record is not None]

    async def update(
        self,
        task_id: str,
        *,
        when: Callable[[TaskRecord], bool] | None = None,
        **fields: str | int,
    ) -> bool:
        """Set fields of a task that has not ended and passes ``when``.

        The check and the write are one transaction. A redelivered handler
        passes a ``when`` that is false once the task moved on, so that
        repeating a step cannot move the task back. Returns whether the
        fields were set.
        """
        key = self.key(task_id)
        values = {name: str(value) for name, value in fields.items()}
        values["updated_ms"] = str(now_ms())
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    current = _decode(await pipe.hgetall(key))
                    if "id" not in current:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return False
                    task = TaskRecord.from_hash(current)
                    if task.ended or (when is not None and not when(task)):
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return False
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(key, mapping=values)  # type: ignore[arg-type]
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    async def claim(self, task_id: str, step: str, owner: str) -> bool:
        """Claim ``step`` for event ``owner``; True for the first claimant only.

        A redelivery of the claiming event gets True again, so it can finish
        what it started.
        """
        key = self.key(task_id, "steps")
        await self.client.hsetnx(key, step, owner)
        return _text(await self.client.hget(key, step) or b"") == owner

    # -- plans and stories -----------------------------------------------

    async def keep(self, task_id: str, part: str, name: str, value: str) -> str:
        """Store ``value`` in field ``name`` of a task hash unless set; return it.

        The first writer wins, so a redelivered handler reuses what its first
        run stored (a plan, a story list) instead of asking its brain again.
        """
        key = self.key(task_id, part)
        await self.client.hsetnx(key, name, value)
        return _text(await self.client.hget(key, name) or b"")

    async def kept(self, task_id: str, part: str, name: str) -> str | None:
        """Return a field that ``keep`` stored, or None."""
        value = await self.client.hget(self.key(task_id, part), name)
        return None if value is None else _text(value)

    async def save_plan(self, task_id: str, version: int, plan: Plan) -> Plan:
        """Store a plan version unless one is stored; return the stored one."""
        stored = await self.keep(task_id, "plans", str(version), plan.model_dump_json())
        return Plan.model_validate_json(stored)

    async def plan(self, task_id: str, version: int) -> Plan | None:
        """Return a stored plan version, or None."""
        stored = await self.kept(task_id, "plans", str(version))
        return Plan.model_validate_json(stored) if stored else None

    async def add_story(self, task_id: str, version: int, story: Story) -> int:
        """Store one story of a plan version; return how many the version has."""
        key = self.key(task_id, "stories", str(version))
        await self.client.hsetnx(key, story.key, story.model_dump_json())
        return int(await self.client.hlen(key))

    async def stories(self, task_id: str, version: int) -> list[Story]:
        """Return the stories of a plan version in key order (S1, S2, ...)."""
        raw = await self.client.hgetall(self.key(task_id, "stories", str(version)))
        stories = [Story.model_validate_json(value) for value in raw.values()]
        return sorted(stories, key=lambda story: int(story.key[1:]))

    # -- one story's rounds and results ----------------------------------

    async def story(self, task_id: str, key: str) -> dict[str, str]:
        """Return a story's state fields (round, status, accepted results)."""
        return _decode(await self.client.hgetall(self.key(task_id, "story", key)))

    async def set_story(self, task_id: str, key: str, **fields: str | int) -> None:
        """Set fields of a story's state."""
        values = {name: str(value) for name, value in fields.items()}
        await self.client.hset(self.key(task_id, "story", key), mapping=values)  # type: ignore[arg-type]

    async def init_story(self, task_id: str, key: str, **fields: str | int) -> None:
        """Set the fields of a story's state that are not set yet."""
        pipe = self.client.pipeline(transaction=True)
        for name, value in fields.items():
            pipe.hsetnx(self.key(task_id, "story", key), name, str(value))
        await pipe.execute()

    async def advance_round(self, task_id: str, key: str, current: int) -> bool:
        """Move a story from round ``current`` to the next one, once.

        Returns True if the story is now in round ``current + 1`` (moved now,
        or by an earlier run of the same step), and False if it is already
        past it, so that a late repeat cannot move a story back.
        """
        story_key = self.key(task_id, "story", key)
        following = current + 1
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(story_key)
                    round = int(await pipe.hget(story_key, "round") or 0)
                    if round != current:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return round == following
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(
                        story_key,
                        mapping={"round": following, "round_started_ms": now_ms()},
                    )
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    async def accept(self, task_id: str, key: str, result: str, event_id: str) -> bool:
        """Accept ``event_id`` as the story's ``result`` unless another was first.

        Returns True for the accepted event, also when it is delivered again,
        and False for a later, superseded one.
        """
        story_key = self.key(task_id, "story", key)
        await self.client.hsetnx(story_key, result, event_id)
        return _text(await self.client.hget(story_key, result) or b"") == event_id

    # -- work leases -------------------------------------------------------

    async def lease(self, task_id: str, item: str, holder: dict[str, Any]) -> Any:
        """Take the lease on a work item, or return the holder's record.

        Returns None when the lease is now held for ``holder`` (taken, or
        already held for the same stream entry), else the other holder.
        """
        key = self.key(task_id, "lease", item)
        ttl_ms = int(holder["ttl_ms"])
        if await self.client.set(key, json.dumps(holder), nx=True, px=ttl_ms):
            return None
        current = await self.client.get(key)
        if current is None:
            return await self.lease(task_id, item, holder)
        other = json.loads(current)
        if other.get("entry") == holder["entry"]:
            await self.client.set(key, json.dumps(holder), px=ttl_ms)
            return None
        return other

    async def renew_lease(
        self, task_id: str, item: str, holder: dict[str, Any]
    ) -> None:
        """Extend a lease this holder still has."""
        key = self.key(task_id, "lease", item)
        current = await self.client.get(key)
        if current is not None and json.loads(current).get("entry") == holder["entry"]:
            await self.client.pexpire(key, int(holder["ttl_ms"]))

    async def release(self, task_id: str, item: str) -> None:
        """Drop the lease on a work item."""
        await self.client.delete(self.key(task_id, "lease", item))

    async def holder(self, task_id: str, item: str) -> dict[str, Any] | None:
        """Return who holds the lease on a work item, or None."""
        current = await self.client.get(self.key(task_id, "lease", item))
        return json.loads(current) if current else None


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(name): _text(value) for name, value in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
