"""Trace context: publishing writes ``traceparent``, handling continues the trace."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from hivebus import Bus, Event
from tests.conftest import REDIS_URL, delete_prefix, eventually

# The handler process: the SDK records its spans, and it prints them as JSON
# once it has handled one event (and published a follow-up from the handler).
HANDLER_SCRIPT = """
import asyncio, json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from hivebus import Bus

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

async def main(url, prefix):
    bus = Bus(url, prefix=prefix, service="handler")
    done = asyncio.Event()

    @bus.subscribe("trace.jobs", durable=True, raw=True)
    async def handle(event):
        await bus.publish("trace.next", {"n": 2}, type="next", raw=True, durable=True)
        done.set()

    async with bus:
        print("ready", flush=True)
        await asyncio.wait_for(done.wait(), 30)
    spans = [
        {
            "name": s.name,
            "kind": s.kind.name,
            "trace_id": s.context.trace_id,
            "span_id": s.context.span_id,
            "parent_id": s.parent.span_id if s.parent else None,
            "attributes": dict(s.attributes),
        }
        for s in exporter.get_finished_spans()
    ]
    print(json.dumps(spans), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def local_tracer() -> tuple[trace.Tracer, InMemorySpanExporter]:
    """Return an SDK tracer that is not the global one, and its span exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def parse_traceparent(value: str) -> tuple[int, int]:
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00"
    assert int(flags, 16) & 1  # sampled
    return int(trace_id, 16), int(span_id, 16)


@pytest.mark.redis_only
async def test_handler_span_child_across_processes(
    prefix: str, raw_redis: aioredis.Redis
) -> None:
    handler = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HANDLER_SCRIPT,
        REDIS_URL,
        prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    bus = Bus(REDIS_URL, prefix=prefix, service="publisher")
    tracer, exporter = local_tracer()

    try:
        assert handler.stdout is not None
        ready = await asyncio.wait_for(handler.stdout.readline(), timeout=30)
        assert ready.strip() == b"ready"
        async with bus:
            with tracer.start_as_current_span("submit task"):
                sent = await bus.publish(
                    "trace.jobs", {"step": 1}, type="job", raw=True, durable=True
                )
            published = await bus.get_event(sent.event_id)
            output, errors = await asyncio.wait_for(handler.communicate(), timeout=60)
            rows = await bus.client.xrange(bus.keys.stream("trace.next"))
    finally:
        if handler.returncode is None:
            handler.kill()
            await handler.wait()
        await delete_prefix(raw_redis, prefix)

    assert handler.returncode == 0, errors.decode()
    follow_up = Event[Any].model_validate_json(rows[0][1][b"e"])
    [publisher_span] = exporter.get_finished_spans()
    spans = json.loads(output.decode().strip().splitlines()[-1])
    [handler_span] = [s for s in spans if s["kind"] == "CONSUMER"]

    assert published.traceparent is not None
    assert parse_traceparent(published.traceparent) == (
        publisher_span.context.trace_id,
        publisher_span.context.span_id,
    )
    assert handler_span["trace_id"] == publisher_span.context.trace_id
    assert handler_span["parent_id"] == publisher_span.context.span_id
    assert handler_span["name"] == "process trace.jobs"
    assert handler_span["attributes"]["messaging.message.id"] == sent.event_id
    assert follow_up.traceparent is not None
    assert parse_traceparent(follow_up.traceparent) == (
        handler_span["trace_id"],
        handler_span["span_id"],
    )


async def test_no_span_no_traceparent(make_bus: Callable[..., Bus]) -> None:
    bus = make_bus()
    async with bus:
        sent = await bus.publish("trace.jobs", {"n": 1}, type="job", raw=True)
        stored = await bus.get_event(sent.event_id)
    assert stored.traceparent is None


async def test_api_only_handler_joins_trace(make_bus: Callable[..., Bus]) -> None:
    seen: list[trace.SpanContext] = []
    recording: list[bool] = []
    bus = make_bus()

    @bus.subscribe("trace.jobs", durable=True, raw=True)
    async def handle(event: Any) -> None:
        span = trace.get_current_span()
        seen.append(span.get_span_context())
        recording.append(span.is_recording())

    tracer, _ = local_tracer()
    async with bus:
        with tracer.start_as_current_span("submit") as span:
            await bus.publish(
                "trace.jobs", {"n": 1}, type="job", raw=True, durable=True
            )
        await eventually(lambda: len(seen) == 1, what="handler run")
    assert seen[0].trace_id == span.get_span_context().trace_id
    assert recording == [False]


async def test_explicit_traceparent_kept(make_bus: Callable[..., Bus]) -> None:
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    bus = make_bus()
    tracer, _ = local_tracer()
    async with bus:
        with tracer.start_as_current_span("other"):
            sent = await bus.publish(
                "trace.jobs", {"n": 1}, type="job", raw=True, traceparent=given
            )
        stored = await bus.get_event(sent.event_id)
    assert stored.traceparent == given
