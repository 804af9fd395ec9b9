"""Team tasks: submit one, read one with its progress, and follow its progress.

A task's progress is a Redis stream, so every update has an id that
increases. ``GET /api/tasks/{id}/progress`` sends the updates as
server-sent events with those ids. A client that reconnects with
``Last-Event-ID`` (browsers do so by themselves) gets the updates after that
id: nothing missed and nothing twice. Without it the stream starts from the
first update. Either way the stream ends after the task's final update,
which is sent also when the task ended while the client was away.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse

from hivebus.connection import TRANSIENT_ERRORS
from hivebus.errors import TaskNotFoundError
from hivebus.team.models import PROGRESS_CHANNEL, ProgressUpdate
from hivebus.team.progress import ProgressLog
from hivebus.team.state import TaskStore, not_found_message
from hivebus.team.tree import event_tree
from hivebus.web import sse
from hivebus.web.services import Services, services

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/tasks", tags=["tasks"])

ServicesDep = Annotated[Services, Depends(services)]


class SubmitRequest(BaseModel):
    """A task for the team; the limits apply for the task's whole life."""

    text: str = Field(min_length=1, max_length=20_000)
    project: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    approve_plan: bool = False
    max_test_rounds: int = Field(default=2, ge=1, le=20)
    token_budget: int | None = Field(default=None, ge=1)


class ProgressFilter(BaseModel):
    """Filter of a progress stream's updates; the final update always passes."""

    role: tuple[str, ...] = ()
    kind: tuple[str, ...] = ()

    def passes(self, update: ProgressUpdate) -> bool:
        """Tell whether ``update`` is sent."""
        if update.final:
            return True
        if self.role and update.role not in self.role:
            return False
        return not self.kind or update.kind in self.kind


def task_store(app: Services) -> TaskStore:
    """Return the task store on the app's bus."""
    return TaskStore(app.bus.client, app.bus.keys)


def progress_log(app: Services) -> ProgressLog:
    """Return the progress log on the app's bus."""
    return ProgressLog(app.bus.client, app.bus.keys)


@router.post("", status_code=201)
async def submit_task(request: SubmitRequest, app: ServicesDep) -> dict[str, Any]:
    """Submit a task to the team; the master picks it up from the tasks channel."""
    task_id = await app.tasks.submit(**request.model_dump())
    return {"task_id": task_id, "progress": f"/api/tasks/{task_id}/progress"}


class RejectRequest(BaseModel):
    """Reason for rejecting a plan, which the master plans again with."""

    comment: str = Field(min_length=1, max_length=4000)


@router.post("/{task_id}/approve")
async def approve_plan(task_id: str, app: ServicesDep) -> dict[str, str]:
    """Approve the plan a task waits on; a repeated approval changes nothing."""
    return {"result": await app.tasks.approve(task_id)}


@router.post("/{task_id}/reject")
async def reject_plan(
    task_id: str, request: RejectRequest, app: ServicesDep
) -> dict[str, str]:
    """Reject the plan a task waits on, with a comment for the next plan."""
    return {"result": await app.tasks.reject(task_id, request.comment)}


@router.post("/{task_id}/cancel")
async def cancel_task(task_id: str, app: ServicesDep) -> dict[str, str]:
    """End a task as cancelled."""
    return {"result": await app.tasks.cancel(task_id)}


@router.get("")
async def list_tasks(
    app: ServicesDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[dict[str, Any]]:
    """Return the most recent tasks, newest first, with their progress in percent."""
    return await recent_tasks(app, limit=limit)


async def recent_tasks(app: Services, *, limit: int) -> list[dict[str, Any]]:
    """Return recent tasks as JSON values, each with ``percent`` done."""
    log = progress_log(app)
    tasks = []
    for record in await task_store(app).recent(limit):
        board = await log.board(record.id)
        percent = int(board.get("percent", {}).get("value", 0))
        if record.status == "completed":
            percent = 100
        tasks.append(record.to_dict() | {"percent": percent})
    return tasks


@router.get("/live")
async def live_progress(app: ServicesDep) -> StreamingResponse:
    """Stream the progress updates of every task as they are broadcast (live only)."""
    return sse.response(_live(app))


async def _live(app: Services) -> AsyncIterator[str]:
    async with app.bus.listen(PROGRESS_CHANNEL) as updates:
        yield sse.message("{}", event="ready")
        async for event in updates:
            update = ProgressUpdate.model_validate(event.model_dump()["data"])
            data = update.model_dump_json()
            yield sse.message(data, event_id=event.id, event="progress")


@router.get("/{task_id}")
async def show_task(task_id: str, app: ServicesDep) -> dict[str, Any]:
    """Return a task with its board, progress updates, tokens and final update."""
    return await task_detail(app, task_id)


async def task_detail(app: Services, task_id: str) -> dict[str, Any]:
    """Return a task's record, board, progress updates, tokens and end as JSON."""
    store, log = task_store(app), progress_log(app)
    record = await store.get(task_id)
    board = await log.board(task_id)
    final = await log.ending(task_id)
    return {
        "task": record.to_dict(),
        "percent": 100 if record.status == "completed" else _percent(board),
        "board": board,
        "progress": [u.model_dump(mode="json") for u in await log.entries(task_id)],
        "tokens": await store.tokens(task_id),
        "final": final.model_dump(mode="json") if final else None,
    }


@router.get("/{task_id}/events")
async def task_events(task_id: str, app: ServicesDep) -> dict[str, Any]:
    """Return the task's events as a tree: each node lists the events it caused."""
    store = task_store(app)
    await store.get(task_id)
    events = await store.events(task_id)
    return {"task_id": task_id, "count": len(events), "tree": event_tree(events)}


@router.get(
    "/{task_id}/progress",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def follow_progress(
    task_id: str,
    app: ServicesDep,
    role: Annotated[list[str] | None, Query()] = None,
    kind: Annotated[list[str] | None, Query()] = None,
    after: Annotated[str | None, Query(description="resume after this id")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Stream a task's progress updates as server-sent events until its end.

    Each message's ``id`` is the update's stream id, and each carries a
    ``retry`` hint. ``Last-Event-ID`` (or ``after``) resumes after that id.
    ``role`` and ``kind`` filter the updates (repeat them for several
    values); the final update, event type ``end``, is always sent.
    """
    start = sse.resume_id_value(last_event_id or after) or "0-0"
    if not await app.bus.client.exists(app.bus.keys.task(task_id)):
        raise TaskNotFoundError(not_found_message(task_id))
    wanted = ProgressFilter(role=tuple(role or ()), kind=tuple(kind or ()))
    return sse.response(_progress(app, task_id, start, wanted))


async def _progress(
    app: Services, task_id: str, after: str, wanted: ProgressFilter
) -> AsyncIterator[str]:
    try:
        async for update in progress_log(app).follow(task_id, after):
            if not wanted.passes(update):
                continue
            event = "end" if update.final else "progress"
            yield sse.message(update.model_dump_json(), event_id=update.id, event=event)
    except TRANSIENT_ERRORS as exc:
        # Ending the response makes the client reconnect with its last id.
        logger.warning("progress stream lost redis task=%s error=%s", task_id, exc)
        yield sse.message(json.dumps({"detail": str(exc)}), event="unavailable")


def _percent(board: dict[str, Any]) -> int:
    return int(board.get("percent", {}).get("value", 0))
