"""The ``hivebus tasks`` commands: list, show, follow, approve, reject and cancel.

None of them needs a running team: they read and change task state in
Redis. ``tasks follow`` exits 0 when the task completes and 1 when it fails
or is cancelled.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from hivebus.cli.common import (
    EXIT_USAGE,
    JsonOption,
    PrefixOption,
    RedisOption,
    app,
    console,
    errors,
    make_bus,
    run,
)
from hivebus.cli.team_view import exit_code, follow_task
from hivebus.team.client import TaskClient
from hivebus.team.progress import status_text
from hivebus.team.report import build_report
from hivebus.team.tree import tree_lines
from hivebus.team.wording import plural

tasks_app = typer.Typer(
    help="List, show, follow, approve, reject and cancel team tasks.",
    no_args_is_help=True,
)
app.add_typer(tasks_app, name="tasks")

PROGRESS_ID = re.compile(r"\d+(-\d+)?")  # a Redis stream id, as XREAD accepts
IdArgument = Annotated[str, typer.Argument(metavar="ID", help="Task id.")]


def _with_client(redis: str, prefix: str) -> TaskClient:
    return TaskClient(make_bus(redis, prefix, service="team.client"))


@tasks_app.command("follow")
def tasks_follow(
    task_id: IdArgument,
    after: Annotated[
        str,
        typer.Option("--from", help="Print only updates after this progress id."),
    ] = "0-0",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print a task's progress (after --from) until it ends."""
    if not PROGRESS_ID.fullmatch(after):
        errors.print(
            f"error: --from {after!r} is not a progress id; give an id that a "
            "progress line starts with, MILLISECONDS-SEQUENCE such as "
            "1733312000000-0 (0-0, the default, prints every update)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_USAGE)
    client = _with_client(redis, prefix)

    async def go() -> int:
        try:
            return exit_code(await follow_task(client, task_id, after, as_json=as_json))
        finally:
            await client.bus.stop()

    raise typer.Exit(run(go))


@tasks_app.command("list")
def tasks_list(
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Most tasks shown.")
    ] = 50,
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """List the most recent tasks, newest first."""
    client = _with_client(redis, prefix)

    async def go() -> list[Any]:
        try:
            return await client.list(limit)
        finally:
            await client.bus.stop()

    records = run(go)
    if as_json:
        for record in records:
            print(json.dumps(record.to_dict()), flush=True)
        return
    # The id column never wraps or truncates, because commands take ids as input.
    id_width = max((len(record.id) for record in records), default=2)
    table = Table(
        Column("id", no_wrap=True, min_width=id_width), "status", "project", "task"
    )
    for record in records:
        table.add_row(record.id, record.status, record.project, record.text[:60])
    console.print(table)


@tasks_app.command("show")
def tasks_show(
    task_id: IdArgument,
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print a task: its state, stories, open work, tokens and event tree."""
    client = _with_client(redis, prefix)

    async def go() -> dict[str, Any]:
        try:
            return await build_report(client, task_id)
        finally:
            await client.bus.stop()

    report = run(go)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    task = report["task"]
    state = status_text(task["status"], task["reason"])
    console.print(f"task {task['id']}: {state}", highlight=False, soft_wrap=True)
    console.print(
        f"text: {task['text']}", markup=False, highlight=False, soft_wrap=True
    )
    for story in report["stories"]:
        console.print(
            f"  {story['key']} {story['status']} {_rounds_text(story)}: "
            f"{story['title']}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        for work in story["open_work"]:
            console.print(
                f"    open: {_describe_work(work)}", highlight=False, soft_wrap=True
            )
    console.print(
        f"tokens: {report['tokens']['task']['total']}", highlight=False, soft_wrap=True
    )
    for line in tree_lines(report["tree"]):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _describe_work(work: dict[str, Any]) -> str:
    age = f"{work['seconds']}s" if work.get("seconds") is not None else "unknown time"
    if work["state"] == "working":
        worker = work["worker"]
        return f"{work['role']} round {work['round']} worked on by {worker} for {age}"
    return f"waiting for a {work['role']} (round {work['round']}) for {age}"


def _steer(
    redis: str, prefix: str, action: str, task_id: str, comment: str = ""
) -> None:
    client = _with_client(redis, prefix)

    async def go() -> str:
        try:
            if action == "approve":
                return await client.approve(task_id)
            if action == "reject":
                return await client.reject(task_id, comment)
            return await client.cancel(task_id)
        finally:
            await client.bus.stop()

    console.print(run(go), highlight=False, soft_wrap=True)


@tasks_app.command("approve")
def tasks_approve(
    task_id: IdArgument,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Approve the plan a task waits on, so the team starts work."""
    _steer(redis, prefix, "approve", task_id)


@tasks_app.command("reject")
def tasks_reject(
    task_id: IdArgument,
    comment: Annotated[
        str, typer.Option("--comment", help="What the new plan should change.")
    ],
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Reject the plan a task waits on; the master plans again with the comment."""
    _steer(redis, prefix, "reject", task_id, comment)


@tasks_app.command("cancel")
def tasks_cancel(
    task_id: IdArgument,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """End a task as cancelled; workers skip its remaining work."""
    _steer(redis, prefix, "cancel", task_id)


def _rounds_text(story: dict[str, Any]) -> str:
    """Return "round 1 of 2", or "(up to 2 rounds)" before the first round."""
    limit = story["max_rounds"]
    if story["rounds"]:
        return f"round {story['rounds']} of {limit}"
    return f"(up to {plural(limit, 'round')})"
