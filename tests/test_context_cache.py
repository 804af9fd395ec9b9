"""The per-service context cache: versions named by requests, invalidation, LRU."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hivebus import Event
from hivebus.context import Context, ContextCache, ContextManager
from hivebus.errors import ConfigError, ContextValidationError
from tests.conftest import eventually


async def test_request_with_newer_version_fetches(make_bus: Any) -> None:
    service = make_bus(service="reviewer")
    service_contexts = ContextManager(service)
    cache = ContextCache(service_contexts, listen=False)

    @service.responder("review", contexts=cache)
    async def review(request: Event[Any], context: Context | None) -> dict[str, Any]:
        assert context is not None
        return {"version": context.version, "n": context.data["n"]}

    caller = make_bus(service="caller")
    async with service, caller:
        manager = ContextManager(caller)
        context = await manager.create({"n": 1})
        for n in (2, 3):
            context = await manager.update(context.id, {"n": n}, version=n - 1)
        primed = await cache.get(context.id)
        at_three = await caller.request(
            "reviewer", "review", {}, raw=True, context=context
        )
        newer = await manager.update(context.id, {"n": 4}, version=3)
        at_four = await caller.request(
            "reviewer", "review", {}, raw=True, context=newer
        )
        await service_contexts.close()
        metrics = await manager.read_metrics()
    assert primed.version == 3
    assert at_three == {"version": 3, "n": 3}
    assert at_four == {"version": 4, "n": 4}
    assert cache.stats.hits == 1
    assert cache.stats.misses == 2
    assert metrics["cache_misses:reviewer"] == 2
    assert metrics["cache_hits:reviewer"] == 1


async def test_status_event_drops_stale_entry(make_bus: Any) -> None:
    service = make_bus(service="reviewer")
    cache = ContextCache(ContextManager(service))
    writer = make_bus(service="writer")
    async with service, writer:
        manager = ContextManager(writer)
        context = await manager.create({"n": 1})
        await cache.get(context.id)
        await manager.update(context.id, {"n": 2}, version=1)
        await eventually(lambda: context.id not in cache, what="entry invalidated")
        fresh = await cache.get(context.id)
    assert cache.stats.invalidations == 1
    assert fresh.version == 2


async def test_named_version_beyond_current_fails(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        cache = ContextCache(manager, listen=False)
        context = await manager.create({"n": 1})
        with pytest.raises(ContextValidationError, match="has no version 7"):
            await cache.get(context.id, min_version=7)


async def test_least_recently_used_evicted(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        cache = ContextCache(manager, max_entries=2, listen=False)
        a, b, c = [await manager.create({"n": n}) for n in range(3)]
        await cache.get(a.id)
        await cache.get(b.id)
        await cache.get(a.id)
        await cache.get(c.id)
    assert a.id in cache
    assert b.id not in cache
    assert c.id in cache
    assert len(cache) == 2
    assert cache.stats.evictions == 1


async def test_old_entry_fetched_again(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        cache = ContextCache(manager, max_age=0.05, listen=False)
        context = await manager.create({"n": 1})
        await cache.get(context.id)

        async def refetched() -> bool:
            await cache.get(context.id)
            return cache.stats.misses == 2

        await eventually(refetched, what="entry past max_age fetched again")
    assert cache.stats.misses == 2


async def test_concurrent_misses_share_fetch(make_bus: Any) -> None:
    bus = make_bus()
    async with bus:
        manager = ContextManager(bus)
        cache = ContextCache(manager, listen=False)
        context = await manager.create({"n": 1})
        before = (await manager.read_metrics())["reads"]
        results = await asyncio.gather(*(cache.get(context.id) for _ in range(20)))
        after = (await manager.read_metrics())["reads"]
    assert {r.version for r in results} == {1}
    assert cache.stats.misses == 20
    assert after - before == 1


async def test_cache_rejects_bad_bounds(make_bus: Any) -> None:
    manager = ContextManager(make_bus())
    with pytest.raises(ConfigError, match="`max_entries`"):
        ContextCache(manager, max_entries=0)
