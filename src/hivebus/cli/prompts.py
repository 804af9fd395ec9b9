"""Commands that show role prompts and their versions, and pin or roll them back."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from hivebus.cli.common import (
    JsonOption,
    PrefixOption,
    RedisOption,
    app,
    console,
    make_bus,
    run,
)
from hivebus.team.prompts import PromptStore, PromptVersion

T = TypeVar("T")

prompts_app = typer.Typer(
    help="Show role prompts and their versions; pin, unpin or roll them back.",
    no_args_is_help=True,
)
app.add_typer(prompts_app, name="prompts")


class RoleName(StrEnum):
    """The team roles, as the ROLE argument accepts them."""

    master = "master"
    pm = "pm"
    developer = "developer"
    ux = "ux"
    tester = "tester"


RoleArgument = Annotated[
    RoleName,
    typer.Argument(metavar="ROLE", help="master, pm, developer, ux or tester."),
]
VersionArgument = Annotated[
    int, typer.Argument(metavar="VERSION", min=1, help="Prompt version number.")
]


def _with_store(
    redis: str, prefix: str, action: Callable[[PromptStore], Awaitable[T]]
) -> T:
    bus = make_bus(redis, prefix)

    async def go() -> T:
        await bus.connect()
        try:
            return await action(PromptStore(bus.client, bus.keys))
        finally:
            await bus.stop()

    return run(go)


def _record(version: PromptVersion, *, current: int, pin: int | None) -> dict[str, Any]:
    data = version.model_dump(mode="json")
    data["current"] = version.version == current
    data["pinned"] = version.version == pin
    return data


def _when(created_ms: int) -> str:
    moment = datetime.fromtimestamp(created_ms / 1000, tz=UTC)
    return moment.isoformat(timespec="seconds")


@prompts_app.command("show")
def prompts_show(
    role: RoleArgument,
    version: Annotated[
        int | None,
        typer.Option("--version", min=1, help="Show this version, not the current."),
    ] = None,
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print a role's prompt: the version in use, or the one given."""

    async def action(store: PromptStore) -> tuple[PromptVersion, int, int | None]:
        current = await store.current(role.value)
        pin = await store.pinned(role.value)
        chosen = current if version is None else await store.get(role.value, version)
        return chosen, current.version, pin

    chosen, current, pin = _with_store(redis, prefix, action)
    if as_json:
        print(json.dumps(_record(chosen, current=current, pin=pin)), flush=True)
        return
    marks = []
    if chosen.version == current:
        marks.append("in use")
    if chosen.version == pin:
        marks.append("pinned")
    suffix = f" ({', '.join(marks)})" if marks else ""
    console.print(
        f"[bold]{chosen.role}[/bold] version {chosen.version}{suffix}", highlight=False
    )
    console.print(f"created: {_when(chosen.created_ms)}", highlight=False)
    console.print(f"reason: {chosen.reason}", markup=False, highlight=False)
    if chosen.triggers:
        console.print(f"triggers: {', '.join(chosen.triggers)}", highlight=False)
    console.print()
    print(chosen.text, flush=True)


@prompts_app.command("history")
def prompts_history(
    role: RoleArgument,
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """List a role's prompt versions, oldest first, with reasons and triggers."""

    async def action(store: PromptStore) -> tuple[list[PromptVersion], int, int | None]:
        current = await store.current(role.value)
        versions = await store.history(role.value)
        return versions, current.version, await store.pinned(role.value)

    versions, current, pin = _with_store(redis, prefix, action)
    if as_json:
        for item in versions:
            print(json.dumps(_record(item, current=current, pin=pin)), flush=True)
        return
    table = Table("version", "created", "in use", "chars", "reason", "triggers")
    for item in versions:
        use = (
            "pinned"
            if item.version == pin
            else "yes"
            if item.version == current
            else ""
        )
        table.add_row(
            str(item.version),
            _when(item.created_ms),
            use,
            str(len(item.text)),
            item.reason,
            ", ".join(item.triggers),
        )
    console.print(table)


@prompts_app.command("pin")
def prompts_pin(
    role: RoleArgument,
    version: VersionArgument,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Use VERSION of a role's prompt until `prompts unpin`, in every process."""
    pinned = _with_store(redis, prefix, lambda store: store.pin(role.value, version))
    console.print(f"{pinned.role} pinned to version {pinned.version}", highlight=False)


@prompts_app.command("unpin")
def prompts_unpin(
    role: RoleArgument,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Use the latest version of a role's prompt again."""

    async def action(store: PromptStore) -> PromptVersion:
        await store.unpin(role.value)
        return await store.current(role.value)

    current = _with_store(redis, prefix, action)
    console.print(
        f"{current.role} unpinned; version {current.version} is in use", highlight=False
    )


@prompts_app.command("rollback")
def prompts_rollback(
    role: RoleArgument,
    version: VersionArgument,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Store VERSION's text as a new latest version and clear any pin."""
    created = _with_store(
        redis, prefix, lambda store: store.rollback(role.value, version)
    )
    console.print(
        f"{created.role} rolled back to the text of version {version}; "
        f"version {created.version} is in use",
        highlight=False,
    )
