"""Progress output of the team commands: live bars, progress lines, the summary."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, Task, TaskID, TextColumn

from hivebus.cli.common import EXIT_ERROR, EXIT_OK, console, errors
from hivebus.team.client import TaskClient
from hivebus.team.models import ProgressUpdate
from hivebus.team.progress import status_text
from hivebus.team.wording import plural

STATE_PERCENT = {
    "pending": 0,
    "started": 50,
    "progress": 75,
    "done": 100,
    "failed": 100,
}


ROW_ORDER = ("master", "pm", "story", "ux", "developer", "tester")
STATE_RANK = {"pending": 0, "started": 1, "progress": 2, "done": 3, "failed": 3}


class SortedProgress(Progress):
    """Rich progress that draws its rows in ``row_key`` order, not insertion order."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(sorted(self.tasks, key=_row_key))


class LiveBoard:
    """Rich progress bars: the whole task, then one bar per story and role.

    Rows are the plan's roles, then the stories in key order with their roles
    in ``ROW_ORDER``. A row never moves back to an older round or an earlier
    state, and the final update marks every row of a passed story done, so
    the rows end as the summary does.
    """

    def __init__(self, target: Console) -> None:
        self.progress = SortedProgress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[state]}"),
            console=target,
        )
        self.total = self.progress.add_task("task", total=100, state="submitted")
        self.rows: dict[str, TaskID] = {}
        self.seen: dict[str, tuple[int, int]] = {}
        self.passed: set[str] = set()

    def __enter__(self) -> LiveBoard:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def apply(self, update: ProgressUpdate) -> None:
        """Move the bars to the states in ``update``."""
        state = update.status if update.kind != "task" else update.message[:60]
        self.progress.update(self.total, completed=update.percent, state=state)
        if update.kind == "role" and update.role is not None:
            self._apply_role(update)
        elif update.kind == "story" and update.story_key is not None:
            self._apply_story(update, update.story_key)
        elif update.final:
            self.progress.update(self.total, state=update.message)
            self._finish(update.status == "completed")

    def state_of(self, name: str) -> str:
        """Return the state text shown on row ``name`` ("S1 tester"), or ""."""
        row = self.rows.get(name)
        if row is None:
            return ""
        return str(self.progress.tasks[row].fields["state"])

    def _apply_role(self, update: ProgressUpdate) -> None:
        name = f"{update.story_key or 'plan'} {update.role}"
        rank = STATE_RANK.get(update.state or "", 1)
        if not self._newer(name, update.round or 0, rank):
            return
        self.progress.update(
            self._row(name),
            completed=STATE_PERCENT.get(update.state or "", 0),
            state=f"{update.state} (round {update.round})",
        )

    def _apply_story(self, update: ProgressUpdate, key: str) -> None:
        ended = update.state in ("passed", "failed")
        self.progress.update(
            self._row(f"{key} story"),
            completed=100 if ended else 50,
            state=f"{update.state} (round {update.round})",
        )
        if update.state == "passed":
            self.passed.add(key)
            for role in ("developer", "tester"):
                self._mark_done(f"{key} {role}")

    def _finish(self, completed: bool) -> None:
        """Mark done every row of a passed story (of every story if completed)."""
        for name in list(self.rows):
            key, role = name.split(" ", 1)
            if key != "plan" and (completed or key in self.passed) and role != "story":
                self._mark_done(name)

    def _mark_done(self, name: str) -> None:
        self.seen[name] = (10**6, STATE_RANK["done"])
        self.progress.update(self._row(name), completed=100, state="done")

    def _newer(self, name: str, round: int, rank: int) -> bool:
        if (round, rank) < self.seen.get(name, (0, 0)):
            return False
        self.seen[name] = (round, rank)
        return True

    def _row(self, name: str) -> TaskID:
        row = self.rows.get(name)
        if row is None:
            row = self.progress.add_task(name, total=100, state="")
            self.rows[name] = row
        return row


def _row_key(task: Task) -> tuple[int, int, str, int]:
    """Sort the total first, then plan rows, then stories by key and role."""
    if task.description == "task":
        return (0, 0, "", 0)
    key, _, role = task.description.partition(" ")
    order = ROW_ORDER.index(role) if role in ROW_ORDER else len(ROW_ORDER)
    if key == "plan":
        return (1, 0, "", order)
    digits = "".join(ch for ch in key if ch.isdigit())
    return (2, int(digits) if digits else 0, key, order)


def print_update(update: ProgressUpdate, as_json: bool) -> None:
    """Print one progress update as a JSON line or a readable line."""
    if as_json:
        print(update.model_dump_json(), flush=True)
        return
    console.print(
        f"{update.id}  {update.percent:3d}%  {update.message}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def summary(report: dict[str, Any], paths: tuple[Path, Path]) -> dict[str, Any]:
    """Return the end-of-run summary as JSON-ready data."""
    task = report["task"]
    rounds = [r for story in report["stories"] for r in story["results"]]
    return {
        "kind": "summary",
        "task_id": task["id"],
        "status": task["status"],
        "reason": task["reason"] or None,
        "seconds": report["seconds"],
        "stories": [
            {
                "key": story["key"],
                "title": story["title"],
                "status": story["status"],
                "rounds": story["rounds"],
            }
            for story in report["stories"]
        ],
        "test_rounds": len([r for r in rounds if r["passed"] is not None]),
        "failed_test_rounds": len([r for r in rounds if r["passed"] is False]),
        "prompt_changes": report["prompt_changes"],
        "tokens": report["tokens"],
        "report": {"markdown": str(paths[0]), "json": str(paths[1])},
    }


def print_summary(report: dict[str, Any], paths: tuple[Path, Path]) -> None:
    """Print the end-of-run summary for a person."""
    data = summary(report, paths)
    state = status_text(data["status"], data["reason"])
    lines = [f"\ntask {data['task_id']} {state}"]
    for story in data["stories"]:
        lines.append(
            f"  {story['key']} {story['status']} after "
            f"{plural(story['rounds'], 'round')}: {story['title']}"
        )

    failed = data["failed_test_rounds"]
    lines.append(f"test rounds: {data['test_rounds']} ({failed} failed)")
    for change in data["prompt_changes"]:
        version = f"{change['role']} v{change['version']}"
        lines.append(f"prompt change: {version}: {change['reason']}")
    if not data["prompt_changes"]:
        lines.append("prompt changes: none")

    tokens = data["tokens"]
    estimated = sum(v.get("estimated", 0) for k, v in tokens.items() if k != "task")
    total = tokens.get("task", {}).get("total", 0)
    lines.append(f"tokens: {total} ({estimated} of them estimated)")
    lines.append(f"time taken: {data['seconds']:.1f}s")
    lines.append(f"report: {paths[0]} and {paths[1]}")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def exit_code(final: ProgressUpdate | None) -> int:
    """Return 0 if the task completed, else 1 (failed, cancelled or still running)."""
    return EXIT_OK if final is not None and final.status == "completed" else EXIT_ERROR


async def follow_task(
    client: TaskClient, task_id: str, after: str, *, as_json: bool
) -> ProgressUpdate | None:
    """Print a task's progress until its final update; return that update."""
    last = after
    try:
        async for update in client.follow(task_id, after):
            last = update.id
            print_update(update, as_json)
            if update.final:
                return update
    except asyncio.CancelledError:
        errors.print(
            f"stopped following; re-attach with: hivebus tasks follow {task_id} "
            f"--from {last}",
            highlight=False,
            soft_wrap=True,
        )
        raise
    return await client.progress.ending(task_id)
