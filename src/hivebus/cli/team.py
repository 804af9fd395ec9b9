"""Commands of the agent team: run a task, run workers, submit and steer tasks.

``run``, ``submit`` (while following) and ``tasks follow`` exit 0 when the
task completes and 1 when it fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import signal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from hivebus.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
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
from hivebus.cli.team_view import LiveBoard, print_summary, print_update, summary
from hivebus.team.client import TaskClient
from hivebus.team.config import TeamSettings
from hivebus.team.models import ProgressUpdate
from hivebus.team.report import build_report, tree_lines, write_report
from hivebus.team.runner import Team


class RoleChoice(StrEnum):
    """The roles a worker process can run."""

    master = "master"
    pm = "pm"
    developer = "developer"
    ux = "ux"
    tester = "tester"


tasks_app = typer.Typer(
    help="List, show, follow, approve, reject and cancel team tasks.",
    no_args_is_help=True,
)
app.add_typer(tasks_app, name="tasks")

TaskArgument = Annotated[
    str, typer.Argument(metavar="TEXT", help="The task, in words.")
]
IdArgument = Annotated[str, typer.Argument(metavar="ID", help="Task id.")]
ProjectOption = Annotated[
    str,
    typer.Option(
        "--project",
        envvar="HIVEBUS_PROJECT",
        help="Project whose context the task uses.",
    ),
]
RoundsOption = Annotated[
    int | None,
    typer.Option(
        "--max-test-rounds",
        min=1,
        help="Implement-and-test rounds per story, the first included "
        "(default: HIVEBUS_MAX_TEST_ROUNDS, else 2).",
    ),
]
BudgetOption = Annotated[
    int | None,
    typer.Option(
        "--token-budget",
        min=1,
        help="Tokens the task may use before it stops (default: "
        "HIVEBUS_TOKEN_BUDGET, else no limit).",
    ),
]
ClaimOption = Annotated[
    float,
    typer.Option(
        "--claim-timeout",
        envvar="HIVEBUS_CLAIM_TIMEOUT",
        min=0.1,
        help="Seconds before a live worker takes over the work of a dead one.",
    ),
]


def _settings(rounds: int | None, budget: int | None) -> TeamSettings:
    overrides: dict[str, Any] = {}
    if rounds is not None:
        overrides["max_test_rounds"] = rounds
    if budget is not None:
        overrides["token_budget"] = budget
    try:
        return TeamSettings(**overrides)
    except ValueError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_USAGE) from None


def _exit_code(final: ProgressUpdate | None) -> int:
    return EXIT_OK if final is not None and final.status == "completed" else EXIT_ERROR


async def _follow(
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
        )
        raise
    return await client.progress.ending(task_id)


@app.command("run")
def run_task(
    text: TaskArgument,
    as_json: Annotated[
        bool, typer.Option("--json", help="Stream progress as JSON lines.")
    ] = False,
    report_dir: Annotated[
        Path,
        typer.Option("--report-dir", help="Directory of the Markdown and JSON report."),
    ] = Path("reports"),
    project: ProjectOption = "default",
    max_test_rounds: RoundsOption = None,
    token_budget: BudgetOption = None,
    claim_timeout: ClaimOption = 30.0,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Run the whole team on a task in this process, with live progress."""
    settings = _settings(max_test_rounds, token_budget)
    bus = make_bus(redis, prefix, service="team")

    async def go() -> int:
        async with Team(bus, settings=settings, claim_timeout=claim_timeout) as team:
            task_id = await team.client.submit(
                text,
                project=project,
                max_test_rounds=settings.max_test_rounds,
                token_budget=settings.token_budget,
            )
            final = await _run_view(team.client, task_id, as_json)
            report = await build_report(team.client, task_id)
        paths = write_report(report, report_dir)
        if as_json:
            print(json.dumps(summary(report, paths)), flush=True)
        else:
            print_summary(report, paths)
        return _exit_code(final)

    raise typer.Exit(run(go))


async def _run_view(
    client: TaskClient, task_id: str, as_json: bool
) -> ProgressUpdate | None:
    if as_json:
        return await _follow(client, task_id, "0-0", as_json=True)
    with LiveBoard(console) as board:
        async for update in client.follow(task_id):
            board.apply(update)
            if update.final:
                return update
    return await client.progress.ending(task_id)


@app.command()
def worker(
    role: Annotated[
        RoleChoice,
        typer.Option(
            "--role",
            help="Role this process runs: master, pm, developer, ux or tester.",
        ),
    ],
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Assignments worked on at once.")
    ] = 8,
    claim_timeout: ClaimOption = 30.0,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Run one role of the team against a shared Redis until stopped."""
    if redis.startswith("memory://"):
        errors.print(
            "warning: a worker on memory:// shares nothing with other processes; "
            "give the team's Redis with --redis or HIVEBUS_REDIS_URL",
            highlight=False,
        )
    bus = make_bus(redis, prefix, service=f"team.{role.value}")
    team = Team(
        bus,
        settings=_settings(None, None),
        roles=[role.value],
        claim_timeout=claim_timeout,
        concurrency=concurrency,
    )

    async def go() -> None:
        current = asyncio.current_task()
        assert current is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
        try:
            await team.run_forever()
        except asyncio.CancelledError:
            return

    run(go)


@app.command()
def submit(
    text: TaskArgument,
    approve_plan: Annotated[
        bool,
        typer.Option(
            "--approve-plan",
            help="Wait for `hivebus tasks approve ID` before any work.",
        ),
    ] = False,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Print progress until the end.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    project: ProjectOption = "default",
    max_test_rounds: RoundsOption = None,
    token_budget: BudgetOption = None,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Submit a task to a running team and follow its progress."""
    settings = _settings(max_test_rounds, token_budget)
    client = TaskClient(make_bus(redis, prefix, service="team.client"))

    async def go() -> int:
        try:
            task_id = await client.submit(
                text,
                project=project,
                approve_plan=approve_plan,
                max_test_rounds=settings.max_test_rounds,
                token_budget=settings.token_budget,
            )
            if as_json:
                print(json.dumps({"task_id": task_id}), flush=True)
            else:
                console.print(f"task {task_id} submitted", highlight=False)
            if not follow:
                return EXIT_OK
            return _exit_code(await _follow(client, task_id, "0-0", as_json=as_json))
        finally:
            await client.bus.stop()

    raise typer.Exit(run(go))


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
    client = _with_client(redis, prefix)

    async def go() -> int:
        try:
            return _exit_code(await _follow(client, task_id, after, as_json=as_json))
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
    table = Table("id", "status", "project", "task")
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
    reason = f" ({task['reason']})" if task["reason"] else ""
    console.print(f"task {task['id']}: {task['status']}{reason}", highlight=False)
    console.print(f"text: {task['text']}", markup=False, highlight=False)
    for story in report["stories"]:
        console.print(
            f"  {story['key']} {story['status']} round {story['rounds']} of "
            f"{story['max_rounds']}: {story['title']}",
            markup=False,
            highlight=False,
        )
        for work in story["open_work"]:
            console.print(f"    open: {_describe_work(work)}", highlight=False)
    console.print(f"tokens: {report['tokens']['task']['total']}", highlight=False)
    for line in tree_lines(report["tree"]):
        console.print(line, markup=False, highlight=False)


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

    console.print(run(go), highlight=False)


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
