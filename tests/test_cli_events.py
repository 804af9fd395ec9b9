"""The publish, events and tail commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from typer.testing import CliRunner

from hivebus.cli import app
from tests.conftest import REDIS_URL, new_prefix

runner = CliRunner()


@pytest.fixture
def cli_prefix() -> Iterator[str]:
    prefix = new_prefix()
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_publish_prints_id_fetchable(cli_prefix: str) -> None:
    common = ["--redis", REDIS_URL, "--prefix", cli_prefix]
    code, out, _ = invoke(
        "publish", "orders", "order.placed", "-d", '{"a": 1}', *common
    )
    assert code == 0
    event_id = out.strip()
    assert len(event_id) == 26
    code, out, _ = invoke("events", "get", event_id, "--json", *common)
    assert code == 0
    event = json.loads(out)
    assert event["id"] == event_id
    assert event["type"] == "order.placed"
    assert event["data"] == {"a": 1}


def test_publish_durable_appends_to_stream(cli_prefix: str) -> None:
    common = ["--redis", REDIS_URL, "--prefix", cli_prefix]
    code, out, err = invoke("publish", "jobs", "job.new", "--durable", *common)
    client = redis.Redis.from_url(REDIS_URL)
    entries = client.xrange(f"{cli_prefix}:{{jobs}}:stream")
    client.close()
    assert code == 0
    assert len(entries) == 1
    assert json.loads(entries[0][1][b"e"])["id"] == out.strip()
    assert "no listener or consumer group" in err


def test_publish_bad_json_names_fix(cli_prefix: str) -> None:
    code, out, err = invoke(
        "publish",
        "orders",
        "t",
        "-d",
        "{oops",
        "--redis",
        REDIS_URL,
        "--prefix",
        cli_prefix,
    )
    assert code == 1
    assert out == ""
    assert "'{oops'" in err
    assert "not valid JSON" in err


def test_publish_bad_channel_exits_nonzero(cli_prefix: str) -> None:
    code, _, err = invoke(
        "publish", "bad channel", "t", "--redis", REDIS_URL, "--prefix", cli_prefix
    )
    assert code == 1
    assert "invalid channel name 'bad channel'" in err


def test_events_get_missing_id(cli_prefix: str) -> None:
    code, _, err = invoke(
        "events", "get", "nope", "--redis", REDIS_URL, "--prefix", cli_prefix
    )
    assert code == 1
    assert "no stored event 'nope'" in err


def test_unreachable_redis_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEBUS_PUBLISH_TIMEOUT", "0.5")
    code, _, err = invoke(
        "publish",
        "orders",
        "t",
        "--redis",
        "redis://127.0.0.1:1/0",
    )
    message = " ".join(err.split())
    assert code == 1
    assert "Redis stayed unreachable for 0.5s" in message
    assert "check that the server is up" in message


def test_version_flag() -> None:
    code, out, _ = invoke("--version")
    assert code == 0
    assert out.startswith("hivebus ")


@pytest.mark.slow
def test_tail_prints_events_as_they_arrive(cli_prefix: str) -> None:
    env = {**os.environ, "HIVEBUS_REDIS_URL": REDIS_URL, "HIVEBUS_PREFIX": cli_prefix}
    tail = subprocess.Popen(
        [sys.executable, "-m", "hivebus.cli", "tail", "status.*", "-n", "2", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert tail.stderr is not None
        banner = tail.stderr.readline()
        assert "listening on 'status.*'" in banner
        sent = []
        deadline = time.monotonic() + 20
        for index in range(2):
            code, out, _ = invoke(
                "publish",
                f"status.{index}",
                "ping",
                "--redis",
                REDIS_URL,
                "--prefix",
                cli_prefix,
            )
            assert code == 0
            sent.append(out.strip())
        stdout, _ = tail.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        tail.kill()
    received = [json.loads(line)["id"] for line in stdout.splitlines()]
    assert tail.returncode == 0
    assert received == sent


@pytest.mark.parametrize("data", ['{"a": NaN}', '{"a": 1e999}', '{"a": -Infinity}'])
def test_publish_rejects_non_json_numbers(cli_prefix: str, data: str) -> None:
    code, out, err = invoke(
        "publish",
        "orders",
        "t",
        "-d",
        data,
        "--redis",
        REDIS_URL,
        "--prefix",
        cli_prefix,
    )
    assert code == 1
    assert out == ""
    assert "JSON cannot carry" in err


def test_password_never_printed_for_bad_scheme() -> None:
    code, _, err = invoke("publish", "orders", "t", "--redis", "http://:s3cret@h:1/0")
    assert code == 2
    assert "s3cret" not in err
    assert "unsupported scheme" in err
    assert "HIVEBUS_REDIS_URL" in err


def test_invalid_setting_names_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEBUS_EVENT_TTL", "abc")
    code, _, err = invoke("publish", "orders", "t")
    assert code == 2
    assert "invalid `event_ttl` (HIVEBUS_EVENT_TTL)" in err


def test_tail_invalid_pattern_is_one_line() -> None:
    code, _, err = invoke("tail", "bad chan!")
    assert code == 1
    assert "invalid channel pattern 'bad chan!'" in err
    assert "Traceback" not in err
