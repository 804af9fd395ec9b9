"""Team and dashboard commands: user mistakes and a down Redis give one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hivebus.cli import app
from tests.redis_server import port_is_open

CLOSED_PORT = 6394  # a private test port that these tests never start
runner = CliRunner()


@pytest.fixture
def closed_url() -> str:
    if port_is_open(CLOSED_PORT):
        pytest.fail(f"port {CLOSED_PORT} should be closed but accepts connections")
    return f"redis://:secret@127.0.0.1:{CLOSED_PORT}/0"


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.stderr


def test_follow_rejects_bad_from() -> None:
    code, err = invoke("tasks", "follow", "01ABC", "--from", "garbage")

    assert code == 2
    assert "--from 'garbage' is not a progress id" in err
    assert "MILLISECONDS-SEQUENCE" in err
    assert "Traceback" not in err


def test_run_rejects_file_report_dir(tmp_path: Path) -> None:
    report_file = tmp_path / "report_file"
    report_file.write_text("not a directory")

    code, err = invoke("run", "Add CSV export", "--report-dir", str(report_file))

    assert code == 2
    assert f"--report-dir {str(report_file)!r} is not a writable directory" in err


def test_submit_memory_exits_with_hint() -> None:
    code, err = invoke("submit", "Add CSV export", env={"HIVEBUS_REDIS_URL": ""})

    assert code == 1
    assert "memory:// lives inside this process" in err
    assert "--redis" in err


def test_request_redis_down_says_unreachable(closed_url: str) -> None:
    code, err = invoke(
        "request", "billing", "x", "--timeout", "0.5", "--redis", closed_url
    )

    assert code == 1
    assert "stayed unreachable" in err
    assert "check that a responder" not in err
    assert "secret" not in err


def test_dashboard_redis_down_exits_once(closed_url: str) -> None:
    code, err = invoke(
        "dashboard",
        "--redis",
        closed_url,
        "--port",
        "8791",
        env={"HIVEBUS_PUBLISH_TIMEOUT": "0.5"},
    )

    assert code == 1
    assert f"127.0.0.1:{CLOSED_PORT}" in err
    assert "dashboard on" not in err
    assert "Traceback" not in err
    assert "secret" not in err
