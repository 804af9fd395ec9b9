"""Progress output of the team commands: live bars, progress lines, the summary."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from hivebus.cli.common import EXIT_ERROR, EXIT_OK, console, errors
from hivebus.team.client import TaskClient
from hivebus.team.models import ProgressUpdate

STATE_PERCENT = {
    "pending": 0,
    "started": 50,
    "progress": 75,
    "done": 100,
    "failed": 100,
}


class LiveBoard:
    """Rich progress bars: the whole task, then one bar per story and role."""

    def __init__(self, target: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[state]}"),
            console=target,
        )
        self.total = self.progress.add_task("task", total=100, state="submitted")
        self.rows: dict[str, TaskID] = {}

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
            name = f"{update.story_key or 'plan'} {update.role}"
            label = f"{update.state} (round {update.round})"
            self.progress.update(
                self._row(name),
                completed=STATE_PERCENT.get(update.state or "", 0),
                state=label,
            )
        elif update.kind == "story" and update.story_key is not None:
            self.progress.update(
                self._row(f"{update.story_key} story"),
                completed=100 if update.state in ("passed", "failed") else 50,
                state=f"{update.state} (round {update.round})",
            )
            if update.state == "passed":
                for role in ("developer", "tester"):
                    name = f"{update.story_key} {role}"
                    self.progress.update(self._row(name), completed=100, state="done")
        elif update.final:
            self.progress.update(self.total, state=update.message)

    def _row(self, name: str) -> TaskID:
        row = self.rows.get(name)
        if row is None:
            row = self.progress.add_task(name, total=100, state="")
            self.rows[name] = row
        return row


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
    reason = f": {data['reason']}" if data["reason"] else ""
    lines = [f"\ntask {data['task_id']} {data['status']}{reason}"]
    for story in data["stories"]:
        lines.append(
            f"  {story['key']} {story['status']} after {story['rounds']} round(s): "
            f"{story['title']}"
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
