"""Prometheus metrics: hooks in the bus, shared counters in Redis, and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from hivebus import BreakerConfig, Bus, RetryPolicy, metrics
from hivebus.config import Settings
from hivebus.keys import Keys
from hivebus.web import create_app
from tests.conftest import eventually
from tests.test_web_api import asgi_client

SUBSCRIPTION = "web.jobs/worker"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text with prometheus-client's parser into name+labels: value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found[(sample.name, labels)] = sample.value
    return found


def local(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_counters_move(
    make_bus: Callable[..., Bus], url: str, prefix: str
) -> None:
    handled: list[int] = []
    worker = make_bus(service="worker")

    @worker.subscribe(
        "web.jobs",
        durable=True,
        raw=True,
        retry=RetryPolicy(max_attempts=2, base=0.01, cap=0.01),
    )
    async def work(event: Any) -> None:
        if event.data["n"] == 0:
            raise ValueError("bad job")
        handled.append(event.data["n"])

    before_published = local("hivebus_events_published_total", type="job")
    before_retried = local(
        "hivebus_events_retried_total", subscription=SUBSCRIPTION, type="job"
    )
    app = create_app(Settings(redis_url=url, prefix=prefix, service="dashboard"))
    async with worker, asgi_client(app) as client:
        for n in range(4):
            await worker.publish(
                "web.jobs", {"n": n}, type="job", raw=True, durable=True
            )

        async def settled() -> bool:
            text = (await client.get("/metrics")).text
            value = samples(text).get(
                (
                    "hivebus_shared_events_dead_lettered_total",
                    (("subscription", SUBSCRIPTION), ("type", "job")),
                )
            )
            return sorted(handled) == [1, 2, 3] and value == 1

        await eventually(settled, what="counts in /metrics")
        response = await client.get("/metrics")
    found = samples(response.text)
    pair = (("subscription", SUBSCRIPTION), ("type", "job"))
    assert response.headers["content-type"].startswith("text/plain")
    assert found[("hivebus_shared_events_published_total", (("type", "job"),))] == 4
    assert found[("hivebus_shared_events_handled_total", pair)] == 3
    assert found[("hivebus_shared_events_failed_total", pair)] == 2
    assert found[("hivebus_shared_events_retried_total", pair)] == 1
    assert found[("hivebus_shared_events_dead_lettered_total", pair)] == 1
    assert found[("hivebus_shared_handler_seconds_total", pair)] > 0
    assert local("hivebus_events_published_total", type="job") - before_published == 4
    retried = local(
        "hivebus_events_retried_total", subscription=SUBSCRIPTION, type="job"
    )
    assert retried - before_retried == 1


async def test_metrics_breaker_state_gauge(url: str, prefix: str) -> None:
    app = create_app(Settings(redis_url=url, prefix=prefix, service="dashboard"))
    async with asgi_client(app) as client:
        bus: Bus = app.state.services.bus
        breaker = bus.breaker("web-mail", BreakerConfig(failure_threshold=1))
        permit = await breaker.acquire()
        await breaker.record(permit, success=False)
        text = (await client.get("/metrics")).text
    found = samples(text)
    name = "hivebus_shared_breaker_state"
    assert found[(name, (("breaker", "web-mail"), ("state", "open")))] == 1
    assert found[(name, (("breaker", "web-mail"), ("state", "closed")))] == 0


async def test_metrics_request_latency_route(url: str, prefix: str) -> None:
    labels = {"method": "GET", "route": "/api/events/{event_id}", "status": "404"}
    before = local("hivebus_http_request_duration_seconds_count", **labels)
    app = create_app(Settings(redis_url=url, prefix=prefix, service="dashboard"))
    async with asgi_client(app) as client:
        await client.get("/api/events/one")
        await client.get("/api/events/two")
    after = local("hivebus_http_request_duration_seconds_count", **labels)
    assert after - before == 2


async def test_stats_api_totals(
    make_bus: Callable[..., Bus], url: str, prefix: str
) -> None:
    bus = make_bus()
    await bus.connect()
    await bus.publish_many("web.feed", [{"n": 1}, {"n": 2}], type="tick", raw=True)
    await metrics.close(bus.client)
    app = create_app(Settings(redis_url=url, prefix=prefix, service="dashboard"))
    async with asgi_client(app) as client:
        stats = (await client.get("/api/stats")).json()
    assert stats["published"] == {"tick": 2}
    assert stats["totals"]["published"] == 2


def test_parse_shared_fields() -> None:
    parsed = metrics.parse_shared(
        {
            "published:order": "5",
            "handled:orders/billing:order": "4",
            "failed:orders/billing:order": "1",
            "seconds:orders/billing:order": "0.5",
            "dead_lettered:orders/billing:": "1",
            "unobserved:orders": "2",
            "something:else": "9",
        }
    )
    assert parsed.published == {"order": 5}
    assert parsed.handled == {("orders/billing", "order"): 4}
    assert parsed.failed == {("orders/billing", "order"): 1}
    assert parsed.seconds == {("orders/billing", "order"): 0.5}
    assert parsed.dead_lettered == {("orders/billing", ""): 1}
    assert parsed.unobserved == {"orders": 2}


async def test_hooks_keep_counts_without_redis(caplog: Any) -> None:
    # Port 1 on loopback refuses connections: Redis is unreachable.
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    keys = Keys("unreachable-test")
    metrics.published(client, keys, ["job", "job"])
    share = metrics._shares[id(client)]
    assert share.writer is not None
    await asyncio.gather(share.writer, return_exceptions=True)  # the failed write
    assert share.counts["published:job"] == 2
    assert "shared counters not written" in caplog.text
    await metrics.close(client)
    await client.aclose()
