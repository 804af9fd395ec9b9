"""How the team commands show progress: live bars, progress lines and the summary."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from hivebus.cli.common import console
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
        """Move the bars to what ``update`` says."""
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
    console.print(
        f"\ntask {data['task_id']} {data['status']}{reason}",
        markup=False,
        highlight=False,
    )
    for story in data["stories"]:
        console.print(
            f"  {story['key']} {story['status']} after {story['rounds']} round(s): "
            f"{story['title']}",
            markup=False,
            highlight=False,
        )
    console.print(
        f"test rounds: {data['test_rounds']} ({data['failed_test_rounds']} failed)",
        highlight=False,
    )
    for change in data["prompt_changes"]:
        console.print(
            f"prompt change: {change['role']} v{change['version']}: {change['reason']}",
            markup=False,
            highlight=False,
        )
    if not data["prompt_changes"]:
        console.print("prompt changes: none", highlight=False)
    total = data["tokens"].get("task", {}).get("total", 0)
    console.print(f"tokens: {total}", highlight=False)
    console.print(f"time taken: {data['seconds']:.1f}s", highlight=False)
    console.print(f"report: {paths[0]} and {paths[1]}", markup=False, highlight=False)
