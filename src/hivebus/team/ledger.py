"""The records of a task: tokens per role, brain calls, prompt changes, events.

Each record is appended under the task's hash tag (``Keys.task``) and kept
as long as the task, so ``hivebus tasks show`` and the reports read them
after the 24-hour event store has expired.
"""

from __future__ import annotations

import json
from typing import Any

from hivebus.connection import Redis
from hivebus.events import Event
from hivebus.keys import Keys
from hivebus.team.brain import Usage
from hivebus.team.tree import summarize


class TaskLedger:
    """Append to and read the records of team tasks under one key prefix."""

    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def key(self, task_id: str, *parts: str) -> str:
        """Return the key of a task, or of one of its parts."""
        return self.keys.task(task_id, *parts)

    # -- cost --------------------------------------------------------------

    async def add_usage(self, task_id: str, role: str, usage: Usage, calls: int) -> int:
        """Add one brain call's usage to the role's totals; return the task total."""
        pipe = self.client.pipeline(transaction=True)
        key = self.key(task_id, "tokens")
        pipe.hincrby(key, f"{role}:prompt", usage.prompt_tokens)
        pipe.hincrby(key, f"{role}:completion", usage.completion_tokens)
        pipe.hincrby(key, f"{role}:calls", calls)
        if usage.estimated:
            pipe.hincrby(key, f"{role}:estimated", usage.total)
        pipe.hincrby(key, "total", usage.total)
        replies = await pipe.execute()
        return int(replies[-1])

    async def tokens(self, task_id: str) -> dict[str, dict[str, int]]:
        """Return tokens per role (prompt, completion, total, estimated, calls)."""
        raw = _decode(await self.client.hgetall(self.key(task_id, "tokens")))
        totals: dict[str, dict[str, int]] = {}
        for name, value in raw.items():
            role, _, part = name.partition(":")
            if part:
                totals.setdefault(role, {})[part] = int(value)
        for role_totals in totals.values():
            role_totals["total"] = role_totals.get("prompt", 0) + role_totals.get(
                "completion", 0
            )
        totals["task"] = {"total": int(raw.get("total", "0"))}
        return totals

    async def total_tokens(self, task_id: str) -> int:
        """Return the tokens the task has used so far."""
        return int(await self.client.hget(self.key(task_id, "tokens"), "total") or 0)

    async def record_call(self, task_id: str, call: dict[str, Any]) -> None:
        """Append one brain call (role, story, prompt version, usage) to the task."""
        await self.client.rpush(self.key(task_id, "calls"), json.dumps(call))

    async def calls(self, task_id: str) -> list[dict[str, Any]]:
        """Return the task's brain calls in the order they finished."""
        rows = await self.client.lrange(self.key(task_id, "calls"), 0, -1)
        return [json.loads(row) for row in rows]

    # -- prompt changes and the event tree --------------------------------

    async def record_prompt_change(self, task_id: str, change: dict[str, Any]) -> None:
        """Append a prompt version that this task's outcome produced."""
        await self.client.rpush(self.key(task_id, "prompts"), json.dumps(change))

    async def prompt_changes(self, task_id: str) -> list[dict[str, Any]]:
        """Return the prompt versions this task's outcome produced."""
        rows = await self.client.lrange(self.key(task_id, "prompts"), 0, -1)
        return [json.loads(row) for row in rows]

    async def record_dead_letter(self, task_id: str, notice: dict[str, Any]) -> None:
        """Append the notice of one of the task's events that was dead-lettered."""
        await self.client.rpush(self.key(task_id, "dead"), json.dumps(notice))

    async def dead_letters(self, task_id: str) -> list[dict[str, Any]]:
        """Return the dead-letter notices of the task's events."""
        rows = await self.client.lrange(self.key(task_id, "dead"), 0, -1)
        return [json.loads(row) for row in rows]

    async def record_event(self, task_id: str, event: Event[Any], channel: str) -> None:
        """Append a summary of one of the task's events, for the event tree."""
        await self.client.rpush(
            self.key(task_id, "events"), json.dumps(summarize(event, channel))
        )

    async def events(self, task_id: str) -> list[dict[str, Any]]:
        """Return the summaries of the task's events in the order they were sent."""
        rows = await self.client.lrange(self.key(task_id, "events"), 0, -1)
        return [json.loads(row) for row in rows]


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in raw.items()
    }
