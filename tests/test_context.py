"""The context manager: versions, compare-and-set, history, diffs, validation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from hivebus import Bus, Event
from hivebus.context import (
    CONTEXT_CHANNEL,
    STATUS_TYPE,
    Context,
    ContextManager,
    ContextStatus,
)
from hivebus.errors import (
    ConfigError,
    ContextConflictError,
    ContextError,
    ContextNotFoundError,
    ContextValidationError,
)
from tests.conftest import eventually


class Plan(BaseModel):
    title: str
    steps: list[str] = []


def collect_status(bus: Bus, seen: list[ContextStatus]) -> None:
    """Record every context status event that ``bus`` hears."""
    bus.types.register(STATUS_TYPE, ContextStatus)

    @bus.subscribe(CONTEXT_CHANNEL)
    async def record(event: Event[ContextStatus]) -> None:
        seen.append(event.data)


async def test_create_returns_version_one(make_bus: Any) -> None:
    bus = make_bus(service="planner")
    async with bus:
        manager = ContextManager(bus)
        context = await manager.create(
            {"goal": "ship"}, project="p1", tags=["alpha", "beta"]
        )
        stored = await manager.get(context.id)
    assert len(context.id) == 26
    assert context.version == 1
    assert context.owner == "planner"
    assert context.project == "p1"
    assert context.tags == ("alpha", "beta")
    assert context.created_at == context.updated_at
    assert context.size == len(b'{"goal":"ship"}')
    assert stored == context


async def test_create_taken_id_fails(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        await manager.create({}, context_id="project-1")
        with pytest.raises(ContextError, match="'project-1' already exists"):
            await manager.create({}, context_id="project-1")


async def test_update_writes_next_version(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        first = await manager.create({"n": 1})
        second = await manager.update(first.id, {"n": 2}, version=1)
        current = await manager.get(first.id)
        old = await manager.get(first.id, 1)
    assert second.version == 2
    assert current.data == {"n": 2}
    assert current.updated_at >= first.updated_at
    assert old.data == {"n": 1}


async def test_concurrent_writers_one_conflicts(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        context = await manager.create({"owner": None})
        results = await asyncio.gather(
            manager.update(context.id, {"owner": "a"}, version=1),
            manager.update(context.id, {"owner": "b"}, version=1),
            return_exceptions=True,
        )
        current = await manager.get(context.id)
        metrics = await manager.read_metrics()
    written = [r for r in results if isinstance(r, Context)]
    conflicts = [r for r in results if isinstance(r, ContextConflictError)]
    assert len(written) == 1
    assert len(conflicts) == 1
    assert conflicts[0].expected == 1
    assert conflicts[0].actual == 2
    assert "at version 2, not 1" in str(conflicts[0])
    assert current.version == 2
    assert current.data == written[0].data
    assert metrics["conflicts"] == 1


async def test_retry_helper_applies_both(make_bus: Any) -> None:
    bus = make_bus()
    both_read = asyncio.Barrier(2)
    async with bus:
        manager = ContextManager(bus)
        context = await manager.create({"items": []})

        def append(item: str) -> Any:
            async def change(current: Context) -> dict[str, Any]:
                if current.version == 1:
                    await both_read.wait()  # both writers start from version 1
                current.data["items"].append(item)
                return current.data

            return change

        results = await asyncio.gather(
            manager.update_with_retry(context.id, append("a")),
            manager.update_with_retry(context.id, append("b")),
        )
        history = await manager.history(context.id)
        metrics = await manager.read_metrics()
    first, last = sorted(results, key=lambda c: c.version)
    assert [c.version for c in history] == [1, 2, 3]
    assert first.version == 2
    assert last.version == 3
    assert sorted(last.data["items"]) == ["a", "b"]
    assert last.data["items"][:1] == first.data["items"]
    assert metrics["conflicts"] >= 1


async def test_retry_helper_none_keeps_version(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        context = await manager.create({"n": 1})
        same = await manager.update_with_retry(context.id, lambda current: None)
    assert same.version == 1


async def test_schema_rejects_invalid_update(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        manager.register_schema("plan", Plan)
        context = await manager.create(Plan(title="ship it"))
        with pytest.raises(ContextValidationError, match="fails schema 'plan'"):
            await manager.update(context.id, {"title": 42, "steps": "x"}, version=1)
        current = await manager.get(context.id)
        stored = await bus.client.exists(bus.keys.context_version(context.id, 2))
        metrics = await manager.read_metrics()
    assert context.schema_name == "plan"
    assert context.data == {"title": "ship it", "steps": []}
    assert current.version == 1
    assert stored == 0
    assert metrics["validation_failures"] == 1


async def test_unregistered_schema_names_fix(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        writer = ContextManager(bus)
        writer.register_schema("plan", Plan)
        context = await writer.create(Plan(title="t"))
        other = ContextManager(bus)
        with pytest.raises(ConfigError, match=r"register_schema\('plan', Model\)"):
            await other.update(context.id, {"title": "u"}, version=1)


async def test_oversized_update_rejected(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus, max_bytes=100)
        context = await manager.create({"text": "short"})
        with pytest.raises(ContextValidationError, match="over the limit of 100"):
            await manager.update(context.id, {"text": "x" * 200}, version=1)
        current = await manager.get(context.id)
    assert current.version == 1


async def test_non_object_data_rejected(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        with pytest.raises(ContextValidationError, match="must be a JSON object"):
            await manager.create([1, 2])  # type: ignore[arg-type]


async def test_history_lists_every_version(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        context = await manager.create({"n": 0})
        for n in range(1, 4):
            await manager.update(context.id, {"n": n}, version=n)
        history = await manager.history(context.id)
        recent = await manager.history(context.id, limit=2)
    assert [c.version for c in history] == [1, 2, 3, 4]
    assert [c.data["n"] for c in history] == [0, 1, 2, 3]
    assert [c.version for c in recent] == [3, 4]


async def test_versions_expire_after_retention(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus, retention=0.3)
        context = await manager.create({"n": 0})
        await manager.update(context.id, {"n": 1}, version=1)

        async def expired() -> bool:
            return [c.version for c in await manager.history(context.id)] == [2]

        await eventually(expired, what="version 1 past retention")
        with pytest.raises(ContextNotFoundError, match="past its retention"):
            await manager.get(context.id, 1)
        current = await manager.get(context.id)
    assert current.version == 2


async def test_diff_names_changed_keys(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        context = await manager.create(
            {"plan": {"title": "a", "steps": [1]}, "old": True, "same": 1}
        )
        await manager.update(
            context.id,
            {"plan": {"title": "b", "steps": [1], "due": "mon"}, "same": 1},
            version=1,
        )
        diff = await manager.diff(context.id, 1, 2)
        none = await manager.diff(context.id, 2, 2)
    assert diff.added == {"/plan/due": "mon"}
    assert diff.removed == {"/old": True}
    assert list(diff.changed) == ["/plan/title"]
    assert diff.changed["/plan/title"].before == "a"
    assert diff.changed["/plan/title"].after == "b"
    assert none.empty


async def test_unknown_context_and_version(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        context = await manager.create({})
        with pytest.raises(ContextNotFoundError, match="'nope'"):
            await manager.get("nope")
        with pytest.raises(ContextNotFoundError, match="no version 5"):
            await manager.get(context.id, 5)
        with pytest.raises(ContextNotFoundError, match="'nope'"):
            await manager.update("nope", {}, version=1)


async def test_changes_publish_status_events(make_bus: Any) -> None:
    seen: list[ContextStatus] = []
    listener = make_bus(service="watcher")
    collect_status(listener, seen)
    bus = make_bus(service="planner")
    async with listener, bus:
        manager = ContextManager(bus)
        context = await manager.create({"n": 0}, project="p1")
        await manager.update(context.id, {"n": 1}, version=1)
        await eventually(lambda: len(seen) == 2, what="two status events")
    assert [(s.status, s.version) for s in seen] == [("created", 1), ("updated", 2)]
    assert {s.context_id for s in seen} == {context.id}
    assert seen[0].service == "planner"
    assert seen[0].project == "p1"


async def test_metrics_shared_between_processes(make_bus: Any) -> None:
    first, second = make_bus(service="a"), make_bus(service="b")
    async with first, second:
        one, two = ContextManager(first), ContextManager(second)
        context = await one.create({"n": 0})
        await two.update(context.id, {"n": 1, "more": "x" * 10}, version=1)
        await one.get(context.id)
        await two.close()
        metrics = await one.read_metrics()
    assert metrics["created"] == 1
    assert metrics["updates"] == 1
    assert metrics["reads"] == 1
    assert metrics["contexts"] == 1
    size = len(b'{"n":1,"more":"xxxxxxxxxx"}')
    assert metrics["largest"] == [{"context_id": context.id, "bytes": size}]


async def test_cause_type_must_be_accepted(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        context = await manager.create({"n": 0}, event_types=["plan.revised"])
        other = bus.event({}, type="story.done", raw=True)
        allowed = bus.event({}, type="plan.revised", raw=True)
        with pytest.raises(ContextValidationError, match=r"'story\.done' may not"):
            await manager.update(context.id, {"n": 1}, version=1, cause=other)
        updated = await manager.update(context.id, {"n": 1}, version=1, cause=allowed)
    assert context.event_types == ("plan.revised",)
    assert updated.cause_id == allowed.id
    assert updated.cause_type == "plan.revised"


# -- events that name a context ------------------------------------------------


async def run_guarded(
    make_bus: Any, publish: Any, *, event_types: list[str] | None = None
) -> tuple[list[tuple[str, int | None]], Bus, ContextManager, Context]:
    """Publish one event through a guarded durable handler; return what it saw."""
    handled: list[tuple[str, int | None]] = []
    bus = make_bus(service="worker")
    manager = ContextManager(bus)

    @bus.subscribe("stories", durable=True, raw=True)
    @manager.validated()
    async def on_story(event: Event[Any], context: Context | None) -> None:
        handled.append((event.id, context.version if context else None))

    await bus.start()
    context = await manager.create({"n": 0}, event_types=event_types)
    await manager.update(context.id, {"n": 1}, version=1)
    await publish(bus, context)
    return handled, bus, manager, context


async def test_guard_passes_valid_event(make_bus: Any) -> None:
    async def publish(bus: Bus, context: Context) -> None:
        await bus.publish(
            "stories",
            {},
            type="story.done",
            raw=True,
            durable=True,
            context_id=context.id,
            context_version=1,
        )

    handled, bus, _, _ = await run_guarded(make_bus, publish)
    await eventually(lambda: len(handled) == 1, what="event handled")
    assert handled[0][1] == 2
    assert await bus.dlq.count() == 0


async def test_guard_passes_event_without_context(make_bus: Any) -> None:
    async def publish(bus: Bus, context: Context) -> None:
        await bus.publish("stories", {}, type="story.done", raw=True, durable=True)

    handled, _, _, _ = await run_guarded(make_bus, publish)
    await eventually(lambda: len(handled) == 1, what="event handled")
    assert handled[0][1] is None


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown context", "no context 'missing'"),
        ("future version", "names version 9"),
        ("type not accepted", "'story.done' may not update"),
        ("version only", "both attributes or neither"),
    ],
)
async def test_guard_dead_letters_invalid_event(
    make_bus: Any, case: str, reason: str
) -> None:
    async def publish(bus: Bus, context: Context) -> None:
        attributes = {
            "unknown context": {"context_id": "missing", "context_version": 1},
            "future version": {"context_id": context.id, "context_version": 9},
            "type not accepted": {"context_id": context.id, "context_version": 2},
            "version only": {"context_version": 2},
        }[case]
        await bus.publish(
            "stories", {}, type="story.done", raw=True, durable=True, **attributes
        )

    seen: list[ContextStatus] = []
    watcher = make_bus(service="watcher")
    collect_status(watcher, seen)
    await watcher.start()
    handled, bus, manager, _ = await run_guarded(
        make_bus, publish, event_types=["plan.revised"]
    )

    async def dead_lettered() -> bool:
        return await bus.dlq.count("stories") == 1

    await eventually(dead_lettered, what="event dead-lettered")
    [entry] = await bus.dlq.entries(channel="stories")
    await eventually(
        lambda: any(s.status == "rejected" for s in seen), what="rejected status"
    )
    metrics = await manager.read_metrics()
    assert handled == []
    assert entry.reason.startswith("context validation failed")
    assert reason in entry.reason
    assert entry.subscription == "worker"
    assert metrics["rejected_events"] == 1
    assert [s.event_type for s in seen if s.status == "rejected"] == ["story.done"]


async def test_guard_on_broadcast_uses_channel(make_bus: Any) -> None:
    handled: list[str] = []
    bus = make_bus(service="watcher")
    manager = ContextManager(bus)

    @bus.subscribe("notes", raw=True)
    @manager.validated(updates=False, channel="notes")
    async def on_note(event: Event[Any], context: Context | None) -> None:
        handled.append(event.id)

    async with bus:
        await bus.publish(
            "notes", {}, type="note", raw=True, context_id="gone", context_version=1
        )

        async def dead_lettered() -> bool:
            return await bus.dlq.count("notes") == 1

        await eventually(dead_lettered, what="broadcast event dead-lettered")
        [entry] = await bus.dlq.entries(channel="notes")
    assert handled == []
    assert entry.subscription == "broadcast:watcher"
    assert "no context 'gone'" in entry.reason
