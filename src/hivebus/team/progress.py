"""Each task's progress: a board of role states, and a stream of updates.

The board (``P:task:{ID}:board``) contains the latest state of every unit of
work: ``plan/master``, ``plan/pm`` and, per story, ``S1/developer``,
``S1/ux`` and ``S1/tester``, plus one field per story with its status. Each
change to the board appends an update to the task's progress stream
(``P:task:{ID}:progress``) in the same transaction, so the stream ids
increase. A client that resumes after the last id it read gets every later
update exactly once.

A task ends once: ``finish`` sets the end marker, the end state and the
final update together. Later updates are dropped, so the final update is
always the last entry of the stream, even when it was written by
``hivebus tasks cancel`` while no worker ran.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import WatchError

from hivebus.connection import Redis
from hivebus.errors import TaskNotFoundError
from hivebus.keys import Keys
from hivebus.team.models import ProgressUpdate
from hivebus.team.state import not_found_message, now_ms

logger = logging.getLogger(__name__)

PLAN_SHARE = 10  # percent of a task that planning (master and pm) accounts for
FOLLOW_BLOCK_MS = 1000  # maximum wait of one blocking read while following a task
RUNNING_MAX = 99  # highest percent before a task has ended
STATE_RANK = {"pending": 0, "started": 1, "progress": 1, "done": 2, "failed": 2}

Board = dict[str, dict[str, Any]]


class ProgressLog:
    """Append to, end, read and follow the progress of tasks."""

    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def _key(self, task_id: str, part: str) -> str:
        return self.keys.task(task_id, part)

    async def update(
        self, update: ProgressUpdate, board: Board | None = None
    ) -> ProgressUpdate | None:
        """Apply ``board`` changes and append ``update``; None if nothing was written.

        A unit's change is applied only if it is not older than the board's
        state (a lower round, or an earlier state of the same round), so a
        late status from a superseded round cannot undo a newer one. A role
        update whose own unit change is older is dropped, so the stream never
        shows a role going back (``started`` after ``done``). Returns None
        once the task ended or when the update was dropped.
        """
        task_id = update.task_id
        end_key, board_key = self._key(task_id, "end"), self._key(task_id, "board")
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(end_key, board_key)
                    if await pipe.exists(end_key):
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return None
                    current = _load_board(await pipe.hgetall(board_key))
                    changes = _newer(current, board or {})
                    if _stale(update, board or {}, changes):
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return None
                    status = await pipe.hget(self.keys.task(task_id), "status")
                    entry = update.model_copy(
                        update={
                            "percent": percent({**current, **changes}, current),
                            "status": _text(status or b"submitted"),
                            "time_ms": now_ms(),
                        }
                    )
                    pipe.multi()  # type: ignore[no-untyped-call]
                    _write_board(pipe, board_key, changes, entry.percent)
                    pipe.xadd(self._key(task_id, "progress"), _fields(entry))
                    replies = await pipe.execute()
                    return entry.model_copy(update={"id": _text(replies[-1])})
                except WatchError:
                    continue

    async def finish(
        self,
        task_id: str,
        status: str,
        reason: str | None,
        cause: str,
        *,
        expect_status: str | None = None,
    ) -> ProgressUpdate | None:
        """End the task with ``status``; return the final update, or None.

        Only the first call ends the task. A repeat by the same ``cause`` (a
        redelivered event) gets the stored final update back, so that it can
        finish its follow-up work. Any other caller gets None. With
        ``expect_status``, the task ends only if it still has that status.
        """
        end_key, board_key = self._key(task_id, "end"), self._key(task_id, "board")
        task_key = self.keys.task(task_id)
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(end_key, board_key, task_key)
                    ended = await pipe.get(end_key)
                    if ended is not None:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return _repeat(json.loads(ended), cause)
                    current_status = await pipe.hget(task_key, "status")
                    if current_status is None:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        raise TaskNotFoundError(not_found_message(task_id))
                    if expect_status and _text(current_status) != expect_status:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return None
                    board = _load_board(await pipe.hgetall(board_key))
                    final = _final(task_id, status, reason, cause, board)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    self._write_end(pipe, final)
                    replies = await pipe.execute()
                    return final.model_copy(update={"id": _text(replies[-1])})
                except WatchError:
                    continue

    def _write_end(self, pipe: Any, final: ProgressUpdate) -> None:
        """Queue the end marker, the end state and the final update."""
        task_id = final.task_id
        pipe.set(self._key(task_id, "end"), final.model_dump_json())
        pipe.hset(
            self.keys.task(task_id),
            mapping={
                "status": final.status,
                "reason": final.reason or "",
                "ended_ms": final.time_ms,
                "updated_ms": final.time_ms,
            },
        )
        pipe.xadd(self._key(task_id, "progress"), _fields(final))

    async def ending(self, task_id: str) -> ProgressUpdate | None:
        """Return the task's final update, or None while it runs."""
        ended = await self.client.get(self._key(task_id, "end"))
        return ProgressUpdate.model_validate_json(ended) if ended else None

    async def board(self, task_id: str) -> Board:
        """Return the task's board: state per unit and status per story."""
        return _load_board(await self.client.hgetall(self._key(task_id, "board")))

    async def entries(
        self, task_id: str, after: str = "0-0", count: int | None = None
    ) -> list[ProgressUpdate]:
        """Return the updates after id ``after``, oldest first."""
        reply: Any = await self.client.xread(
            {self._key(task_id, "progress"): after}, count=count
        )
        return _parse(reply)

    async def follow(
        self, task_id: str, after: str = "0-0", *, block_ms: int = FOLLOW_BLOCK_MS
    ) -> AsyncIterator[ProgressUpdate]:
        """Yield the updates after id ``after`` as they come, ending with the final.

        A client that was away catches up from its last id. If the final
        update is at or before ``after``, the iterator ends at once.
        """
        if not await self.client.exists(self.keys.task(task_id)):
            raise TaskNotFoundError(not_found_message(task_id))
        stream, end_key = self._key(task_id, "progress"), self._key(task_id, "end")
        while True:
            ended = bool(await self.client.exists(end_key))
            reply: Any = await self.client.xread(
                {stream: after}, count=100, block=None if ended else block_ms
            )
            _raise_if_cancelling()
            updates = _parse(reply)
            for update in updates:
                after = update.id
                yield update
                if update.final:
                    return
            if not updates and ended:
                return


def _raise_if_cancelling() -> None:
    """Raise CancelledError if this task was cancelled and a library swallowed it.

    redis-py 8.2's asyncio client sometimes completes a command that was
    cancelled while in flight and returns its reply, so a loop of commands
    would never see the cancellation (a Ctrl-C on `tasks follow` included).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def percent(board: Board, previous: Board | None = None) -> int:
    """Return the share of the task's work that is done, from 0 to 100.

    Planning counts for ``PLAN_SHARE`` percent and the stories' units of
    work for the rest. The value never falls below the one stored before,
    so a story sent back for another round keeps the bar where it was, and
    it stays at most ``RUNNING_MAX`` because only the final update of a
    completed task reports 100.
    """
    plan_units = [v for k, v in board.items() if k.startswith("plan/")]
    story_units = [
        v for k, v in board.items() if "/" in k and not k.startswith("plan/")
    ]
    plan_done = sum(1 for unit in plan_units if unit.get("state") == "done")
    value = PLAN_SHARE * plan_done / 2
    if story_units:
        done = sum(1 for unit in story_units if unit.get("state") == "done")
        value += (100 - PLAN_SHARE) * done / len(story_units)
    before = (previous or board).get("percent", {}).get("value", 0)
    return min(max(int(value), int(before)), RUNNING_MAX)


def _final(
    task_id: str, status: str, reason: str | None, cause: str, board: Board
) -> ProgressUpdate:
    return ProgressUpdate(
        task_id=task_id,
        kind="end",
        status=status,
        percent=100 if status == "completed" else percent(board),
        reason=reason,
        message=f"task {status_text(status, reason)}",
        final=True,
        cause=cause,
        time_ms=now_ms(),
    )


def status_text(status: str, reason: str | None) -> str:
    """Return ``status`` with its reason: "failed: S1 ...", "cancelled by user"."""
    if not reason:
        return status
    if reason.startswith(f"{status} "):
        return reason
    return f"{status}: {reason}"


def _newer(current: Board, changes: Board) -> Board:
    applied: Board = {}
    for name, change in changes.items():
        old = current.get(name)
        if old is None or "/" not in name or _not_older(change, old):
            applied[name] = change
    return applied


def _stale(update: ProgressUpdate, board: Board, applied: Board) -> bool:
    """Tell whether ``update`` is a role status older than its unit's board state."""
    if update.kind != "role" or update.role is None:
        return False
    unit = f"{update.story_key or 'plan'}/{update.role}"
    return unit in board and unit not in applied


def _not_older(change: dict[str, Any], old: dict[str, Any]) -> bool:
    new_round, old_round = int(change.get("round", 1)), int(old.get("round", 1))
    if new_round != old_round:
        return new_round > old_round
    rank = STATE_RANK.get(str(change.get("state")), 1)
    return rank >= STATE_RANK.get(str(old.get("state")), 1)


def _write_board(pipe: Any, key: str, changes: Board, value: int) -> None:
    fields = {name: json.dumps(change) for name, change in changes.items()}
    fields["percent"] = json.dumps({"value": value})
    pipe.hset(key, mapping=fields)


def _load_board(raw: dict[Any, Any]) -> Board:
    return {_text(name): json.loads(value) for name, value in raw.items()}


def _repeat(ended: dict[str, Any], cause: str) -> ProgressUpdate | None:
    final = ProgressUpdate.model_validate(ended)
    return final if final.cause == cause else None


def _fields(update: ProgressUpdate) -> dict[Any, Any]:
    return {"u": update.model_dump_json(exclude={"id"})}


def _parse(reply: Any) -> list[ProgressUpdate]:
    updates = []
    for _stream, rows in reply or []:
        for entry_id, fields in rows:
            update = ProgressUpdate.model_validate_json(fields[b"u"])
            updates.append(update.model_copy(update={"id": _text(entry_id)}))
    return updates


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
