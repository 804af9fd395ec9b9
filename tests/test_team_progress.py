"""Task progress: the board never goes back, the percent stays below 100, the view."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from hivebus.cli.team_view import LiveBoard
from hivebus.team.client import TaskClient
from hivebus.team.models import ProgressUpdate
from hivebus.team.progress import RUNNING_MAX, Board, percent


def role_update(task_id: str, role: str, state: str, round: int = 1) -> ProgressUpdate:
    return ProgressUpdate(
        task_id=task_id,
        kind="role",
        role=role,
        story_key="S2",
        state=state,
        round=round,
        message=f"{role} {state} on S2 (round {round})",
    )


def role_board(role: str, state: str, round: int = 1) -> Board:
    return {f"S2/{role}": {"state": state, "round": round}}


async def test_late_started_keeps_done(make_bus: Any) -> None:
    client = TaskClient(make_bus())
    task_id = await client.submit("Add CSV export to the orders page")
    progress = client.progress
    done = role_update(task_id, "tester", "done")
    started = role_update(task_id, "tester", "started")

    await progress.update(done, role_board("tester", "done"))
    late = await progress.update(started, role_board("tester", "started"))

    board = await progress.board(task_id)
    messages = [entry.message for entry in await progress.entries(task_id)]
    assert late is None
    assert board["S2/tester"]["state"] == "done"
    assert "tester started on S2 (round 1)" not in messages


async def test_next_round_started_applies(make_bus: Any) -> None:
    client = TaskClient(make_bus())
    task_id = await client.submit("Add CSV export to the orders page")
    progress = client.progress

    await progress.update(
        role_update(task_id, "tester", "done"), role_board("tester", "done")
    )
    entry = await progress.update(
        role_update(task_id, "tester", "started", 2),
        role_board("tester", "started", 2),
    )

    board = await progress.board(task_id)
    assert entry is not None
    assert board["S2/tester"] == {"state": "started", "round": 2}


def test_percent_below_100_while_running() -> None:
    board: Board = {
        "plan/master": {"state": "done"},
        "plan/pm": {"state": "done"},
        "S1/developer": {"state": "done", "round": 1},
        "S1/tester": {"state": "done", "round": 1},
    }

    assert percent(board) == RUNNING_MAX


def test_percent_keeps_stored_value() -> None:
    board: Board = {"S1/developer": {"state": "pending", "round": 2}}
    board["percent"] = {"value": 60}

    assert percent(board) == 60


def live_board() -> LiveBoard:
    return LiveBoard(Console(file=io.StringIO(), width=100))


def test_live_board_ignores_older_state() -> None:
    view = live_board()

    view.apply(role_update("t", "tester", "done"))
    view.apply(role_update("t", "tester", "started"))

    assert view.state_of("S2 tester") == "done (round 1)"


def test_live_board_final_marks_rows_done() -> None:
    view = live_board()
    view.apply(role_update("t", "tester", "started"))
    final = ProgressUpdate(
        task_id="t",
        kind="end",
        status="completed",
        percent=100,
        message="task completed",
        final=True,
    )

    view.apply(final)

    assert view.state_of("S2 tester") == "done"


def test_live_board_sorts_rows() -> None:
    view = live_board()
    for key, role in [("S10", "tester"), ("S2", "tester"), ("S2", "developer")]:
        view.apply(
            ProgressUpdate(
                task_id="t", kind="role", role=role, story_key=key, state="started"
            )
        )
    view.apply(ProgressUpdate(task_id="t", kind="role", role="pm", state="done"))

    table = next(iter(view.progress.get_renderables()))
    out = Console(file=io.StringIO(), width=100, record=True)
    out.print(table)
    names = [line[:22].strip() for line in out.export_text().splitlines()]
    assert names == ["task", "plan pm", "S2 developer", "S2 tester", "S10 tester"]
