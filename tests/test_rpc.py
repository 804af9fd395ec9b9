"""Request and response: replies by correlation id, deadlines, errors, no leaks."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from hivebus import Bus, Event, RemoteError, RequestTimeoutError
from hivebus.errors import ConfigError
from hivebus.rpc import request_channel
from tests.conftest import REDIS_URL, delete_prefix, eventually, new_prefix

ROOT = Path(__file__).resolve().parent.parent


class Greeting(BaseModel):
    name: str


class Reply(BaseModel):
    text: str


def echo_responder(bus: Bus, *, delay: float = 0.0, **options: Any) -> None:
    """Make ``bus`` respond to ``echo`` requests with their data after ``delay`` s."""

    @bus.responder("echo", **options)
    async def echo(request: Event[Any]) -> Any:
        if delay:
            await asyncio.sleep(delay)
        return {"echo": request.data, "correlation_id": request.correlationid}


async def serve(url: str, prefix: str, delay: float) -> None:
    """Serve ``echo`` requests as service ``echo`` until stdin closes."""
    bus = Bus(url, prefix=prefix, service="echo")
    echo_responder(bus, delay=delay, concurrency=128)
    async with bus:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def start_responder(prefix: str, delay: float = 0.0) -> subprocess.Popen[str]:
    """Start ``serve`` in another process and wait until it is ready."""
    code = (
        "import asyncio, sys; from tests.test_rpc import serve; "
        "asyncio.run(serve(sys.argv[1], sys.argv[2], float(sys.argv[3])))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, REDIS_URL, prefix, str(delay)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "ready", f"responder did not start: {line!r}"
    return process


def stop_responder(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def test_request_returns_response(make_bus: Any) -> None:
    responder = make_bus(service="echo")
    echo_responder(responder)
    caller = make_bus(service="caller")
    async with responder, caller:
        response = await caller.request("echo", "echo", {"n": 1}, raw=True)
    assert response["echo"] == {"n": 1}
    assert caller.requester.pending == 0


async def test_typed_request_and_response(make_bus: Any) -> None:
    responder = make_bus(service="greeter")
    caller = make_bus(service="caller")
    for bus in (responder, caller):
        bus.types.register("greet", Greeting)
        bus.types.register("greet.reply", Reply)

    @responder.responder("greet")
    async def greet(request: Event[Greeting]) -> Reply:
        return Reply(text=f"hello {request.data.name}")

    async with responder, caller:
        response = await caller.request("greeter", "greet", Greeting(name="ada"))
    assert response == Reply(text="hello ada")


async def test_response_model_validates_json(make_bus: Any) -> None:
    responder = make_bus(service="greeter")

    @responder.responder("greet")
    async def greet(request: Event[Any]) -> dict[str, str]:
        return {"text": "hi"}

    caller = make_bus(service="caller")
    async with responder, caller:
        response = await caller.request(
            "greeter", "greet", {}, raw=True, response_model=Reply
        )
    assert response == Reply(text="hi")


async def test_responder_error_raises_remote(make_bus: Any) -> None:
    responder = make_bus(service="calc")

    @responder.responder("divide")
    async def divide(request: Event[Any]) -> float:
        return float(request.data["a"] / request.data["b"])

    caller = make_bus(service="caller")
    async with responder, caller:
        with pytest.raises(RemoteError) as caught:
            await caller.request("calc", "divide", {"a": 1, "b": 0}, raw=True)
    assert caught.value.service == "calc"
    assert caught.value.error_type == "ZeroDivisionError"
    assert "division by zero" in caught.value.remote_message
    assert responder.responders.stats.failed == 1


async def test_unknown_request_type_raises_remote(make_bus: Any) -> None:
    responder = make_bus(service="echo")
    echo_responder(responder)
    caller = make_bus(service="caller")
    async with responder, caller:
        with pytest.raises(RemoteError, match="no responder for request type 'nope'"):
            await caller.request("echo", "nope", {}, raw=True)


async def test_unencodable_response_raises_remote(make_bus: Any) -> None:
    responder = make_bus(service="odd")

    @responder.responder("odd")
    async def odd(request: Event[Any]) -> Any:
        return {"when": object()}

    caller = make_bus(service="caller")
    async with responder, caller:
        with pytest.raises(RemoteError) as caught:
            await caller.request("odd", "odd", {}, raw=True)
    assert caught.value.service == "odd"
    assert "object" in caught.value.remote_message


async def test_none_response_returns_none(make_bus: Any) -> None:
    responder = make_bus(service="sink")

    @responder.responder("drop")
    async def drop(request: Event[Any]) -> None:
        return None

    caller = make_bus(service="caller")
    async with responder, caller:
        assert await caller.request("sink", "drop", {}, raw=True) is None


async def test_request_carries_context_and_deadline(make_bus: Any) -> None:
    seen: list[Event[Any]] = []
    responder = make_bus(service="probe")

    @responder.responder("look")
    async def look(request: Event[Any]) -> dict[str, Any]:
        seen.append(request)
        return {}

    class Ref:
        id = "ctx-1"
        version = 4

    caller = make_bus(service="caller")
    async with responder, caller:
        now_ms = caller.requester.clock.now_ms()
        await caller.request("probe", "look", {}, raw=True, context=Ref(), timeout=5)
    [request] = seen
    assert request.contextid == "ctx-1"
    assert request.contextversion == 4
    assert request.replyto == caller.requester.channel
    assert request.deadline is not None
    assert 4_000 <= request.deadline - now_ms <= 5_500


async def test_many_in_flight_each_gets_own(make_bus: Any) -> None:
    responder = make_bus(service="echo")
    echo_responder(responder, delay=0.01)
    caller = make_bus(service="caller")
    async with responder, caller:
        responses = await asyncio.gather(
            *(
                caller.request("echo", "echo", {"n": n}, raw=True, timeout=30)
                for n in range(200)
            )
        )
    assert [r["echo"]["n"] for r in responses] == list(range(200))
    assert caller.requester.pending == 0


async def test_timeout_at_deadline_then_late_reply(make_bus: Any) -> None:
    caller = make_bus(service="caller")
    async with caller:
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError) as caught:
            await caller.request("down", "echo", {"n": 1}, raw=True, timeout=0.3)
        elapsed = time.monotonic() - started
        assert caller.requester.pending == 0

        stream = caller.keys.stream(request_channel("down"))
        [(_, fields)] = await caller.client.xrange(stream)
        request = json.loads(fields[b"e"])
        late = Event[Any](
            source="down",
            type="hivebus.reply",
            data={"late": True},
            correlationid=request["correlationid"],
        )
        await caller.client.publish(request["replyto"], late.model_dump_json())
        await eventually(
            lambda: caller.requester.late_replies == 1, what="late reply counted"
        )
    assert 0.3 <= elapsed < 0.8
    assert "'down'" in str(caught.value)
    assert "0.3s" in str(caught.value)
    assert caller.requester.timeouts == 1
    assert caller.requester.pending == 0


async def test_malformed_reply_is_dropped(make_bus: Any) -> None:
    responder = make_bus(service="echo")
    echo_responder(responder)
    caller = make_bus(service="caller")
    async with responder, caller:
        await caller.request("echo", "echo", {"n": 0}, raw=True)
        await caller.client.publish(caller.requester.channel, b"not json")
        await eventually(
            lambda: caller.requester.malformed_replies == 1, what="malformed reply"
        )
        response = await caller.request("echo", "echo", {"n": 1}, raw=True)
    assert response["echo"] == {"n": 1}
    assert caller.requester.late_replies == 0


async def test_expired_request_is_not_handled(make_bus: Any) -> None:
    caller = make_bus(service="caller")
    async with caller:
        with pytest.raises(RequestTimeoutError):
            await caller.request("echo", "echo", {"n": 1}, raw=True, timeout=0.1)
    handled: list[Any] = []
    responder = make_bus(service="echo")

    @responder.responder("echo")
    async def echo(request: Event[Any]) -> Any:
        handled.append(request.data)
        return request.data

    async with responder:
        await eventually(
            lambda: responder.responders.stats.expired == 1, what="request dropped"
        )
    assert handled == []


async def test_handler_cancelled_at_deadline(make_bus: Any) -> None:
    responder = make_bus(service="slow")
    release = asyncio.Event()

    @responder.responder("wait")
    async def wait(request: Event[Any]) -> None:
        await release.wait()

    caller = make_bus(service="caller")
    async with responder, caller:
        with pytest.raises(RequestTimeoutError):
            await caller.request("slow", "wait", {}, raw=True, timeout=0.3)
        await eventually(
            lambda: responder.responders.stats.cancelled == 1, what="handler cancelled"
        )
    assert responder.responders.stats.handled == 0


async def test_duplicate_responder_rejected(make_bus: Any) -> None:
    responder = make_bus(service="echo")
    echo_responder(responder)
    with pytest.raises(ConfigError, match="'echo' already has a responder"):
        echo_responder(responder)


async def test_context_argument_needs_cache(make_bus: Any) -> None:
    bus = make_bus(service="echo")
    with pytest.raises(ConfigError, match="contexts=ContextCache"):

        @bus.responder("look")
        async def look(request: Event[Any], context: Any) -> None:
            return None


async def test_cancelled_requests_leave_nothing(
    make_bus: Any, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    responder = make_bus(service="echo")
    echo_responder(responder, delay=0.1)
    caller = make_bus(service="caller")
    outcomes: list[str] = []

    async def call(n: int) -> None:
        try:
            await asyncio.wait_for(
                caller.request("echo", "echo", {"n": n}, raw=True, timeout=5),
                timeout=random.uniform(0.001, 0.15),
            )
            outcomes.append("ok")
        except TimeoutError:
            outcomes.append("timeout")

    async with responder, caller:
        await asyncio.gather(*(call(n) for n in range(300)))
        assert caller.requester.pending == 0
        if backend == "redis":
            # Only the reply listener's Pub/Sub connection stays checked out.
            pool = caller.client.connection_pool
            await eventually(
                lambda: len(pool._in_use_connections) <= 1,
                what="pooled connections returned",
            )
        for n in range(20):
            started = time.monotonic()
            response = await caller.request("echo", "echo", {"n": n}, raw=True)
            assert response["echo"] == {"n": n}
            assert time.monotonic() - started < 1.0
    assert len(outcomes) == 300
    assert set(outcomes) <= {"ok", "timeout"}
    assert "never retrieved" not in caplog.text


@pytest.fixture
async def redis_bus() -> AsyncIterator[Callable[..., Bus]]:
    """A factory of buses on the real Redis only, sharing one key prefix."""
    prefix = new_prefix()
    buses: list[Bus] = []

    def factory(**overrides: Any) -> Bus:
        bus = Bus(REDIS_URL, **{"prefix": prefix, "service": "svc", **overrides})
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.stop(drain_timeout=2)
    cleaner = factory()
    await cleaner.connect()
    await delete_prefix(cleaner.client, prefix)
    await cleaner.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_thousand_requests_to_other_process(redis_bus: Any) -> None:
    caller = redis_bus(service="caller")
    process = start_responder(caller.settings.prefix)
    try:
        async with caller:
            responses = await asyncio.gather(
                *(
                    caller.request("echo", "echo", {"n": n}, raw=True, timeout=60)
                    for n in range(1000)
                )
            )
    finally:
        stop_responder(process)
    assert [r["echo"]["n"] for r in responses] == list(range(1000))
    assert caller.requester.pending == 0
    assert caller.requester.late_replies == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_short_timeouts_leak_nothing(redis_bus: Any) -> None:
    responder = redis_bus(service="echo")
    echo_responder(responder, delay=0.3, cancel_at_deadline=False, concurrency=128)
    caller = redis_bus(service="caller", health_check_interval=1)
    timeouts = 0

    @responder.responder("echo.fast")
    async def fast(request: Event[Any]) -> Any:
        return {"echo": request.data, "correlation_id": request.correlationid}

    async def call(n: int, timeout: float, type: str = "echo") -> Any:
        return await caller.request("echo", type, {"n": n}, raw=True, timeout=timeout)

    async with responder, caller:
        for start in range(0, 500, 50):
            results = await asyncio.gather(
                *(call(n, 0.05) for n in range(start, start + 50)),
                return_exceptions=True,
            )
            timeouts += sum(isinstance(r, RequestTimeoutError) for r in results)
        assert caller.requester.pending == 0
        stats = responder.responders.stats
        await eventually(
            lambda: stats.handled + stats.expired == 500,
            timeout=30,
            what="every request answered late or dropped as expired",
        )
        await eventually(
            lambda: caller.requester.late_replies == stats.handled,
            what="every reply of a timed-out request counted as late",
        )
        slow = await asyncio.gather(*(call(n, 2.0) for n in range(100)))
        for n in range(200):
            response = await call(n, 2.0, "echo.fast")
            assert response["echo"] == {"n": n}
        channel = caller.requester.channel
        late = caller.requester.late_replies

    [(_, subscribers)] = await numsub(channel)
    assert timeouts == 500
    assert late > 0
    assert [r["echo"]["n"] for r in slow] == list(range(100))
    assert caller.requester.pending == 0
    assert subscribers == 0


async def numsub(channel: str) -> list[tuple[Any, int]]:
    """Return ``PUBSUB NUMSUB channel`` from a fresh connection."""
    probe = Bus(REDIS_URL)
    await probe.connect()
    try:
        return list(await probe.client.pubsub_numsub(channel))
    finally:
        await probe.stop()
