"""Commands that show contexts, their history, diffs and metrics."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
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
from hivebus.context import Context, ContextDiff, ContextManager

T = TypeVar("T")

context_app = typer.Typer(
    help="Show contexts, their version history and diffs.", no_args_is_help=True
)
app.add_typer(context_app, name="context")

ContextIdArgument = Annotated[str, typer.Argument(metavar="ID", help="Context id.")]


def _with_manager(
    redis: str, prefix: str, action: Callable[[ContextManager], Awaitable[T]]
) -> T:
    bus = make_bus(redis, prefix)

    async def go() -> T:
        await bus.connect()
        manager = ContextManager(bus)
        try:
            return await action(manager)
        finally:
            await manager.close()
            await bus.stop()

    return run(go)


def _dump(context: Context) -> dict[str, Any]:
    return context.model_dump(mode="json")


@context_app.command("show")
def context_show(
    context_id: ContextIdArgument,
    version: Annotated[
        int | None, typer.Option("--version", help="Show this version.")
    ] = None,
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print a context: the current version, or the one given."""
    context = _with_manager(redis, prefix, lambda m: m.get(context_id, version))
    if as_json:
        print(json.dumps(_dump(context)), flush=True)
        return
    for name, value in _dump(context).items():
        if name != "data":
            console.print(f"[bold]{name}[/bold]: {value}", highlight=False)
    console.print("[bold]data[/bold]:")
    console.print_json(json.dumps(context.data))


@context_app.command("history")
def context_history(
    context_id: ContextIdArgument,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Most recent versions shown.")
    ] = 100,
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """List the kept versions of a context, oldest first."""
    versions = _with_manager(
        redis, prefix, lambda m: m.history(context_id, limit=limit)
    )
    if as_json:
        for context in versions:
            print(json.dumps(_dump(context)), flush=True)
        return
    table = Table("version", "updated at", "updated by", "cause", "bytes")
    for context in versions:
        cause = f"{context.cause_type} {context.cause_id}" if context.cause_id else ""
        table.add_row(
            str(context.version),
            context.updated_at.isoformat(),
            context.updated_by,
            cause,
            str(context.size),
        )
    console.print(table)


@context_app.command("diff")
def context_diff(
    context_id: ContextIdArgument,
    from_version: Annotated[int, typer.Argument(metavar="V1", help="Older version.")],
    to_version: Annotated[int, typer.Argument(metavar="V2", help="Newer version.")],
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print the keys added, removed and changed between two versions."""
    diff = _with_manager(
        redis, prefix, lambda m: m.diff(context_id, from_version, to_version)
    )
    if as_json:
        print(diff.model_dump_json(), flush=True)
        return
    _print_diff(diff)


def _print_diff(diff: ContextDiff) -> None:
    console.print(
        f"context {diff.context_id}: version {diff.from_version} to {diff.to_version}",
        highlight=False,
    )
    if diff.empty:
        console.print("no changes")
    for pointer, value in diff.added.items():
        console.print(f"+ {pointer}: {json.dumps(value)}", markup=False)
    for pointer, value in diff.removed.items():
        console.print(f"- {pointer}: {json.dumps(value)}", markup=False)
    for pointer, change in diff.changed.items():
        before, after = json.dumps(change.before), json.dumps(change.after)
        console.print(f"~ {pointer}: {before} -> {after}", markup=False)


@context_app.command("metrics")
def context_metrics(
    as_json: JsonOption = False,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Print the context counters shared by every process, and the largest contexts."""
    metrics = _with_manager(redis, prefix, lambda m: m.read_metrics())
    if as_json:
        print(json.dumps(metrics), flush=True)
        return
    for name, value in metrics.items():
        if name != "largest":
            console.print(f"{name}: {value}", highlight=False)
    for row in metrics["largest"]:
        console.print(
            f"largest: {row['context_id']} {row['bytes']} bytes", highlight=False
        )
