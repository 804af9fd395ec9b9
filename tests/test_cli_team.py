"""The team commands: run, submit and tasks (list, show, follow, approve, cancel)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from hivebus.cli import app
from tests.conftest import REDIS_URL, new_prefix

TASK = "Add CSV export to the orders page: filter by date range, include totals"
LONG_TASK = (
    "Add CSV export to the orders page: filter by date range, include totals, "
    "record who exported"
)

runner = CliRunner()


@pytest.fixture
def cli_prefix() -> Iterator[str]:
    prefix = new_prefix()
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_run_completes_and_reports(tmp_path: Path) -> None:
    prefix = new_prefix()
    code, out, err = invoke(
        "run", LONG_TASK, "--report-dir", str(tmp_path), "--prefix", prefix
    )
    reports = sorted(tmp_path.iterdir())
    data = json.loads(reports[0].read_text())

    assert code == 0, err
    assert "completed" in out
    assert "S1 passed after 2 rounds" in out
    assert "test rounds: 5 (1 failed)" in out
    assert "prompt change: developer v2" in out
    assert "time taken:" in out
    assert [path.suffix for path in reports] == [".json", ".md"]
    assert data["task"]["status"] == "completed"
    assert str(reports[0]) in out.replace("\n", "")


def test_run_json_matches_redis(tmp_path: Path, cli_prefix: str) -> None:
    code, out, err = invoke(
        "run",
        TASK,
        "--json",
        "--report-dir",
        str(tmp_path),
        "--redis",
        REDIS_URL,
        "--prefix",
        cli_prefix,
    )
    lines = [json.loads(line) for line in out.splitlines()]
    updates, summary = lines[:-1], lines[-1]
    task_id = summary["task_id"]
    code_show, shown, _ = invoke(
        "tasks", "show", task_id, "--json", "--redis", REDIS_URL, "--prefix", cli_prefix
    )
    client = redis.Redis.from_url(REDIS_URL)
    total = client.hget(f"{cli_prefix}:task:{{{task_id}}}:tokens", "total")
    client.close()

    assert code == 0, err
    ids = [tuple(map(int, update["id"].split("-"))) for update in updates]
    assert ids == sorted(set(ids))
    assert updates[-1]["final"]
    assert updates[-1]["status"] == "completed"
    assert summary["kind"] == "summary"
    assert code_show == 0
    assert summary["tokens"] == json.loads(shown)["tokens"]
    assert summary["tokens"]["task"]["total"] == int(total or 0)


def test_run_round_limit_exits_one(tmp_path: Path) -> None:
    code, out, _ = invoke(
        "run",
        LONG_TASK,
        "--max-test-rounds",
        "1",
        "--report-dir",
        str(tmp_path),
        "--prefix",
        new_prefix(),
    )

    assert code == 1
    assert "failed: story S1" in out.replace("\n", " ")
    assert "its only round" in out.replace("\n", " ")


def test_tasks_commands_without_team(cli_prefix: str) -> None:
    common = ("--redis", REDIS_URL, "--prefix", cli_prefix)
    code, out, err = invoke("submit", TASK, "--no-follow", "--json", *common)
    task_id = json.loads(out)["task_id"]
    listed = invoke("tasks", "list", "--json", *common)
    shown = invoke("tasks", "show", task_id, "--json", *common)
    approved = invoke("tasks", "approve", task_id, *common)
    cancelled = invoke("tasks", "cancel", task_id, *common)
    again = invoke("tasks", "cancel", task_id, *common)
    followed = invoke("tasks", "follow", task_id, "--json", *common)
    final = json.loads(followed[1].splitlines()[-1])
    resumed = invoke("tasks", "follow", task_id, "--from", final["id"], *common)

    assert code == 0, err
    assert [json.loads(line)["id"] for line in listed[1].splitlines()] == [task_id]
    assert json.loads(shown[1])["task"]["status"] == "submitted"
    assert approved[0] == 1
    assert "not awaiting approval" in approved[2]
    assert "without --approve-plan" in approved[2]
    assert cancelled[0] == 0
    assert "cancelled" in cancelled[1]
    assert again[0] == 1
    assert "already ended (cancelled" in again[2]
    assert followed[0] == 1
    assert final["final"]
    assert final["status"] == "cancelled"
    assert resumed == (1, "", "")


def test_approve_unknown_task_fails(cli_prefix: str) -> None:
    code, out, err = invoke(
        "tasks", "approve", "nope", "--redis", REDIS_URL, "--prefix", cli_prefix
    )

    assert code == 1
    assert out == ""
    assert "no task 'nope'" in err


def test_reject_needs_comment(cli_prefix: str) -> None:
    code, _, err = invoke(
        "tasks", "reject", "any", "--redis", REDIS_URL, "--prefix", cli_prefix
    )

    assert code == 2
    assert "--comment" in err


def test_worker_rejects_unknown_role() -> None:
    code, _, err = invoke("worker", "--role", "boss")

    assert code == 2
    assert "boss" in err
