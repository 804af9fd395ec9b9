"""The prompt store: versions, pins, rollbacks, concurrent proposals, and the CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from hivebus import Bus
from hivebus.cli import app
from hivebus.errors import PromptError, PromptNotFoundError
from hivebus.team.prompts import (
    DEFAULT_PROMPTS,
    MAX_PROMPT_CHARS,
    PromptStore,
)
from hivebus.team.work import ROLES
from tests.conftest import REDIS_URL, new_prefix


async def store_on(bus: Bus) -> PromptStore:
    await bus.connect()
    return PromptStore(bus.client, bus.keys)


async def test_defaults_are_version_one(make_bus: Any) -> None:
    store = await store_on(make_bus())

    await store.ensure_defaults()

    for role in ROLES:
        current = await store.current(role)
        assert current.version == 1
        assert current.text == DEFAULT_PROMPTS[role]
        assert current.reason == "built-in default"
        assert current.diff == ""


async def test_ensure_defaults_idempotent(make_bus: Any) -> None:
    first = await store_on(make_bus())
    second = await store_on(make_bus())

    await asyncio.gather(first.ensure_defaults(), second.ensure_defaults())
    await first.ensure_defaults()

    assert await second.latest_version("developer") == 1
    assert len(await second.history("developer")) == 1


async def test_current_creates_default_lazily(make_bus: Any) -> None:
    store = await store_on(make_bus())

    current = await store.current("tester")
    first_pm = await store.get("pm", 1)

    assert current.version == 1
    assert current.text == DEFAULT_PROMPTS["tester"]
    assert first_pm.text == DEFAULT_PROMPTS["pm"]


async def test_propose_adds_version_with_diff(make_bus: Any) -> None:
    store = await store_on(make_bus())
    text = DEFAULT_PROMPTS["developer"] + "\n\n- Cover every criterion."

    created = await store.propose(
        "developer", text, reason="tester findings", triggers=["evt-1", "evt-2"]
    )

    assert created.version == 2
    assert created.reason == "tester findings"
    assert created.triggers == ("evt-1", "evt-2")
    assert "--- developer v1" in created.diff
    assert "+++ developer v2" in created.diff
    assert "+- Cover every criterion." in created.diff
    assert (await store.current("developer")).text == text
    assert [v.version for v in await store.history("developer")] == [1, 2]


async def test_propose_same_text_keeps_version(make_bus: Any) -> None:
    store = await store_on(make_bus())

    same = await store.propose("pm", DEFAULT_PROMPTS["pm"], reason="no change")

    assert same.version == 1
    assert await store.latest_version("pm") == 1


async def test_current_reads_other_process_change(make_bus: Any) -> None:
    writer = await store_on(make_bus())
    reader = await store_on(make_bus())
    assert (await reader.current("developer")).version == 1

    await writer.propose("developer", "You are the developer. v2", reason="r")

    current = await reader.current("developer")
    assert current.version == 2
    assert current.text == "You are the developer. v2"


async def test_pin_overrides_latest(make_bus: Any) -> None:
    store = await store_on(make_bus())
    await store.propose("developer", "You are the developer. v2", reason="r")

    await store.pin("developer", 1)
    pinned = await store.current("developer")
    await store.unpin("developer")
    unpinned = await store.current("developer")

    assert pinned.version == 1
    assert unpinned.version == 2
    assert await store.pinned("developer") is None


async def test_pin_unknown_version_raises(make_bus: Any) -> None:
    store = await store_on(make_bus())

    with pytest.raises(PromptNotFoundError, match="no version 7") as caught:
        await store.pin("ux", 7)

    assert "prompts history ux" in str(caught.value)
    assert await store.pinned("ux") is None


async def test_rollback_stores_old_text(make_bus: Any) -> None:
    store = await store_on(make_bus())
    await store.propose("developer", "You are the developer. v2", reason="r")
    await store.pin("developer", 2)

    created = await store.rollback("developer", 1)

    assert created.version == 3
    assert created.text == DEFAULT_PROMPTS["developer"]
    assert created.reason == "rollback to version 1"
    assert await store.pinned("developer") is None
    assert (await store.current("developer")).version == 3


async def test_concurrent_propose_distinct_versions(make_bus: Any) -> None:
    stores = [await store_on(make_bus()) for _ in range(2)]

    async def propose_many(store: PromptStore, name: str) -> list[int]:
        made = []
        for n in range(8):
            created = await store.propose(
                "developer", f"You are the developer. {name}-{n}", reason=name
            )
            made.append(created.version)
        return made

    first, second = await asyncio.gather(
        propose_many(stores[0], "a"), propose_many(stores[1], "b")
    )

    assert sorted(first + second) == list(range(2, 18))
    history = await stores[0].history("developer")
    assert [v.version for v in history] == list(range(1, 18))
    for before, after in itertools.pairwise(history):
        assert f"--- developer v{before.version}" in after.diff
        assert f"-{before.text}" in after.diff


async def test_propose_if_latest_detects_conflict(make_bus: Any) -> None:
    store = await store_on(make_bus())
    await store.propose("pm", "You are the project manager. v2", reason="r")

    stale = await store.propose_if_latest(
        "pm", 1, "You are the project manager. v3", reason="r"
    )
    fresh = await store.propose_if_latest(
        "pm", 2, "You are the project manager. v3", reason="r"
    )

    assert stale is None
    assert fresh is not None
    assert fresh.version == 3


async def test_oversized_prompt_rejected(make_bus: Any) -> None:
    store = await store_on(make_bus())

    with pytest.raises(PromptError, match=f"cap of {MAX_PROMPT_CHARS}"):
        await store.propose("developer", "x" * (MAX_PROMPT_CHARS + 1), reason="r")

    assert await store.latest_version("developer") == 1


async def test_unknown_role_rejected(make_bus: Any) -> None:
    store = await store_on(make_bus())

    with pytest.raises(PromptError, match="unknown role 'designer'"):
        await store.current("designer")


async def test_history_limit_keeps_newest(make_bus: Any) -> None:
    store = await store_on(make_bus())
    for n in range(3):
        await store.propose("ux", f"You are the UX designer. {n}", reason="r")

    newest = await store.history("ux", limit=2)

    assert [v.version for v in newest] == [3, 4]


# -- the command line (real Redis) -------------------------------------------


@pytest.fixture
def cli_prefix() -> Iterator[str]:
    prefix = new_prefix()
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def invoke(prefix: str, *args: str) -> Any:
    options = ["--redis", REDIS_URL, "--prefix", prefix]
    return CliRunner().invoke(app, ["prompts", *args, *options])


def test_cli_show_json(cli_prefix: str) -> None:
    result = invoke(cli_prefix, "show", "developer", "--json")

    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["version"] == 1
    assert shown["text"] == DEFAULT_PROMPTS["developer"]
    assert shown["current"] is True
    assert shown["pinned"] is False


def test_cli_pin_unpin_rollback(cli_prefix: str) -> None:
    bus = Bus(REDIS_URL, prefix=cli_prefix)

    async def propose() -> None:
        store = await store_on(bus)
        await store.propose("developer", "You are the developer. v2", reason="learn")
        await bus.stop()

    asyncio.run(propose())

    pinned = invoke(cli_prefix, "pin", "developer", "1")
    shown = json.loads(invoke(cli_prefix, "show", "developer", "--json").stdout)
    unpinned = invoke(cli_prefix, "unpin", "developer")
    rolled = invoke(cli_prefix, "rollback", "developer", "1")
    history = invoke(cli_prefix, "history", "developer", "--json")

    assert pinned.exit_code == 0, pinned.output
    assert "pinned to version 1" in pinned.stdout
    assert shown["version"] == 1
    assert shown["pinned"] is True
    assert "version 2 is in use" in unpinned.stdout
    assert "version 3 is in use" in rolled.stdout
    lines = [json.loads(line) for line in history.stdout.splitlines()]
    assert [line["version"] for line in lines] == [1, 2, 3]
    assert lines[1]["reason"] == "learn"
    assert lines[2]["text"] == DEFAULT_PROMPTS["developer"]
    assert [line["current"] for line in lines] == [False, False, True]


def test_cli_show_missing_version_fails(cli_prefix: str) -> None:
    result = invoke(cli_prefix, "show", "tester", "--version", "9")

    assert result.exit_code == 1
    assert "no version 9" in result.output


def test_cli_unknown_role_is_usage_error(cli_prefix: str) -> None:
    result = invoke(cli_prefix, "pin", "designer", "1")

    assert result.exit_code == 2
    assert "designer" in result.output
