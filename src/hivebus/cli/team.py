"""Commands of the agent team: run a task, run workers, submit and steer tasks.

``run``, ``submit`` (while following) and ``tasks follow`` exit 0 when the
task completes and 1 when it fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from hivebus.bus import Bus
from hivebus.cli import team_tasks  # noqa: F401 - importing registers `hivebus tasks`
from hivebus.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    PrefixOption,
    RedisOption,
    app,
    console,
    errors,
    make_bus,
    run,
)
from hivebus.cli.team_view import (
    LiveBoard,
    exit_code,
    follow_task,
    print_summary,
    summary,
)
from hivebus.error_handler import ErrorHandler
from hivebus.team.client import TaskClient
from hivebus.team.config import TeamSettings
from hivebus.team.models import ProgressUpdate
from hivebus.team.report import build_report, write_report
from hivebus.team.runner import Team


class RoleChoice(StrEnum):
    """The roles a worker process can run."""

    master = "master"
    pm = "pm"
    developer = "developer"
    ux = "ux"
    tester = "tester"
    errors = "errors"  # the error handler service, not an agent


TaskArgument = Annotated[
    str, typer.Argument(metavar="TEXT", help="The task, in words.")
]
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
        errors.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None


@app.command("run")
def run_task(
    text: TaskArgument,
    as_json: Annotated[
        bool, typer.Option("--json", help="Stream progress as JSON lines.")
    ] = False,
    report_dir: Annotated[
        Path,
        typer.Option(
            "--report-dir",
            envvar="HIVEBUS_REPORT_DIR",
            help="Directory of the Markdown and JSON report.",
        ),
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
    _check_report_dir(report_dir)
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
        paths = _save_report(report, report_dir)
        if as_json:
            print(json.dumps(summary(report, paths)), flush=True)
        else:
            print_summary(report, paths)
        return exit_code(final)

    raise typer.Exit(run(go))


def _check_report_dir(directory: Path) -> None:
    """Exit before the task runs if the report could not be written to ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        errors.print(
            f"error: --report-dir {str(directory)!r} is not a writable directory "
            f"({exc.strerror or exc}); give a directory you can write to",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_USAGE) from None


def _save_report(report: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write the report to ``directory``, or to a new temporary one if that fails."""
    try:
        return write_report(report, directory)
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="hivebus-report-"))
        errors.print(
            f"warning: cannot write the report to {str(directory)!r} "
            f"({exc.strerror or exc}); writing it to {str(fallback)!r} instead",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return write_report(report, fallback)


async def _run_view(
    client: TaskClient, task_id: str, as_json: bool
) -> ProgressUpdate | None:
    if as_json:
        return await follow_task(client, task_id, "0-0", as_json=True)
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
            help=(
                "Role this process runs: master, pm, developer, ux or tester, "
                "or errors (the error handler that records dead letters)."
            ),
        ),
    ],
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            envvar="HIVEBUS_CONCURRENCY",
            min=1,
            help="Entries handled at once per channel of the role.",
        ),
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
            soft_wrap=True,
        )
    if role is RoleChoice.errors:
        _run_error_handler(make_bus(redis, prefix, service="errors"), concurrency)
        return
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


def _run_error_handler(bus: Bus, concurrency: int) -> None:
    """Run the error handler service on ``bus`` until SIGINT or SIGTERM."""
    ErrorHandler(bus, concurrency=concurrency)

    async def go() -> None:
        current = asyncio.current_task()
        assert current is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
        try:
            await bus.run_forever()
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
    if redis.startswith("memory://"):
        errors.print(
            "error: memory:// lives inside this process, so no worker can see a "
            "task submitted there; give the Redis that the running workers use "
            "with --redis or HIVEBUS_REDIS_URL, or run the whole team here with "
            "`hivebus run`",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_ERROR)
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
                console.print(
                    f"task {task_id} submitted", highlight=False, soft_wrap=True
                )
            if not follow:
                return EXIT_OK
            return exit_code(await follow_task(client, task_id, "0-0", as_json=as_json))
        finally:
            await client.bus.stop()

    raise typer.Exit(run(go))
