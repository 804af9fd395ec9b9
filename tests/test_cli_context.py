"""The context and request commands."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hivebus import Bus, Event
from hivebus.cli import app
from hivebus.context import ContextManager
from tests.conftest import REDIS_URL, delete_prefix

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


async def _versions(url: str, prefix: str) -> str:
    """Create a context with three versions and return its id."""
    bus = Bus(url, prefix=prefix, service="planner")
    async with bus:
        manager = ContextManager(bus)
        context = await manager.create({"title": "a", "steps": []}, project="p1")
        await manager.update(context.id, {"title": "b", "steps": []}, version=1)
        await manager.update(context.id, {"title": "b", "steps": ["x"]}, version=2)
        await manager.close()
    return context.id


async def _cleanup(url: str, prefix: str) -> None:
    bus = Bus(url, prefix=prefix)
    await bus.connect()
    await delete_prefix(bus.client, prefix)
    await bus.stop()


@pytest.fixture
def context_id(url: str, prefix: str) -> Iterator[str]:
    yield asyncio.run(_versions(url, prefix))
    asyncio.run(_cleanup(url, prefix))


def invoke(url: str, prefix: str, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [*args, "--redis", url, "--prefix", prefix])
    return result.exit_code, result.stdout, " ".join(result.stderr.split())


def test_show_prints_current_version(url: str, prefix: str, context_id: str) -> None:
    code, out, _ = invoke(url, prefix, "context", "show", context_id, "--json")
    shown = json.loads(out)
    assert code == 0
    assert shown["id"] == context_id
    assert shown["version"] == 3
    assert shown["data"] == {"title": "b", "steps": ["x"]}
    assert shown["project"] == "p1"


def test_show_given_version(url: str, prefix: str, context_id: str) -> None:
    code, out, _ = invoke(
        url, prefix, "context", "show", context_id, "--version", "1", "--json"
    )
    assert code == 0
    assert json.loads(out)["data"] == {"title": "a", "steps": []}


def test_show_unknown_id_fails(url: str, prefix: str, context_id: str) -> None:
    code, out, err = invoke(url, prefix, "context", "show", "nope")
    assert code == 1
    assert out == ""
    assert "no context 'nope'" in err


def test_history_lists_versions(url: str, prefix: str, context_id: str) -> None:
    code, out, _ = invoke(url, prefix, "context", "history", context_id, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [row["version"] for row in rows] == [1, 2, 3]
    assert [row["data"]["title"] for row in rows] == ["a", "b", "b"]


def test_history_table_names_versions(url: str, prefix: str, context_id: str) -> None:
    code, out, _ = invoke(url, prefix, "context", "history", context_id)
    assert code == 0
    assert "planner" in out
    assert "version" in out


def test_diff_json_names_keys(url: str, prefix: str, context_id: str) -> None:
    code, out, _ = invoke(
        url, prefix, "context", "diff", context_id, "1", "3", "--json"
    )
    diff = json.loads(out)
    assert code == 0
    assert diff["from_version"] == 1
    assert diff["to_version"] == 3
    assert diff["added"] == {}
    assert diff["removed"] == {}
    assert diff["changed"] == {
        "/steps": {"before": [], "after": ["x"]},
        "/title": {"before": "a", "after": "b"},
    }


def test_diff_text_marks_changes(url: str, prefix: str, context_id: str) -> None:
    code, out, _ = invoke(url, prefix, "context", "diff", context_id, "2", "3")
    assert code == 0
    assert '~ /steps: [] -> ["x"]' in out


def test_metrics_counts_updates(url: str, prefix: str, context_id: str) -> None:
    code, out, _ = invoke(url, prefix, "context", "metrics", "--json")
    metrics = json.loads(out)
    assert code == 0
    assert metrics["created"] == 1
    assert metrics["updates"] == 2
    assert metrics["largest"][0]["context_id"] == context_id


async def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``hivebus ARGS`` in a subprocess, so the test's event loop keeps going."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hivebus.cli",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), " ".join(err.decode().split())


@pytest.fixture
async def responder(prefix: str) -> Any:
    """Service ``echo`` on the real Redis, with responders for ``echo`` and ``fail``."""
    bus = Bus(REDIS_URL, prefix=prefix, service="echo")

    @bus.responder("echo")
    async def echo(request: Event[Any]) -> Any:
        return {"echo": request.data}

    @bus.responder("fail")
    async def fail(request: Event[Any]) -> Any:
        raise KeyError("missing")

    async with bus:
        yield bus
    # Delete only after the stop: until then the consumer recreates its stream
    # and group, and the stop writes the publish counters to the stats hash.
    await _cleanup(REDIS_URL, prefix)


async def test_request_prints_response(prefix: str, responder: Bus) -> None:
    code, out, _ = await run_cli(
        "request", "echo", "echo", "--data", '{"n": 1}', "--redis", REDIS_URL,
        "--prefix", prefix,
    )  # fmt: skip
    assert code == 0
    assert json.loads(out) == {"echo": {"n": 1}}


async def test_request_remote_error_exits_one(prefix: str, responder: Bus) -> None:
    code, out, err = await run_cli(
        "request", "echo", "fail", "--redis", REDIS_URL, "--prefix", prefix
    )
    assert code == 1
    assert out == ""
    assert "KeyError" in err


async def test_request_timeout_exits_one(prefix: str, responder: Bus) -> None:
    code, _, err = await run_cli(
        "request", "nobody", "echo", "--timeout", "0.2", "--redis", REDIS_URL,
        "--prefix", prefix,
    )  # fmt: skip
    assert code == 1
    assert "'nobody'" in err
    assert "timed out" in err
