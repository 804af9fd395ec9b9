"""The HTTP API: tasks and their progress streams, events, dead letters and access."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from hivebus import BreakerConfig, Bus, RetryPolicy
from hivebus.config import Settings
from hivebus.team.brain import Ask, Brain, Thought
from hivebus.team.offline import OfflineBrain
from hivebus.team.progress import ProgressLog
from hivebus.team.runner import Team
from hivebus.web import create_app
from tests.conftest import REDIS_URL, eventually

TOKEN = "test-token-0123456789abcdef"


# -- helpers shared with the browser test -----------------------------------


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 on a free port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started or task.done(), what="server start")
        if task.done():
            task.result()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        sock.close()


class GatedBrain:
    """The offline brain, except that every role but the master waits for a gate."""

    name = "gated-offline"

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self._inner = OfflineBrain()

    async def think(self, ask: Ask[Any]) -> Thought[Any]:
        if ask.role != "master":
            await self.gate.wait()
        return await self._inner.think(ask)

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def running_team(
    url: str, prefix: str, brain: Brain | None = None
) -> AsyncIterator[Team]:
    """Run every role of the team in this process, on the offline brain."""
    bus = Bus(url, prefix=prefix, service="team")
    team = Team(bus, brain=brain or OfflineBrain(), claim_timeout=5.0)
    async with team:
        yield team


def web_settings(url: str, prefix: str) -> Settings:
    return Settings(redis_url=url, prefix=prefix, service="dashboard")


async def sse_messages(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """Yield each server-sent event message of ``response`` as its fields."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if fields:
                yield fields
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data" and "data" in fields:
            value = fields["data"] + "\n" + value
        fields[name] = value


async def read_progress(
    client: httpx.AsyncClient,
    url: str,
    *,
    last_event_id: str | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, str]], bool]:
    """Read up to ``limit`` messages; return them and whether the server ended."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    messages = []
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for message in sse_messages(response):
            messages.append(message)
            if limit is not None and len(messages) >= limit:
                return messages, False
    return messages, True


def ids_of(messages: list[dict[str, str]]) -> list[str]:
    return [m["id"] for m in messages]


def id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)


async def stored_progress(url: str, prefix: str, task_id: str) -> list[Any]:
    bus = Bus(url, prefix=prefix, service="check")
    await bus.connect()
    try:
        return await ProgressLog(bus.client, bus.keys).entries(task_id)
    finally:
        await bus.stop()


@pytest.fixture
async def web_prefix(prefix: str) -> AsyncIterator[str]:
    """A key prefix on the real Redis, deleted after the test."""
    yield prefix
    cleaner = Bus(REDIS_URL, prefix=prefix)
    await cleaner.connect()
    keys = [k async for k in cleaner.client.scan_iter(f"{prefix}:*", count=1000)]
    if keys:
        await cleaner.client.delete(*keys)
    await cleaner.stop()


@asynccontextmanager
async def asgi_client(app: FastAPI, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client that calls ``app`` in process, with its lifespan run."""
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", **options
        ) as client,
    ):
        yield client


# -- tasks and progress streams ---------------------------------------------


async def test_task_progress_follows_to_end(web_prefix: str) -> None:
    app = create_app(web_settings(REDIS_URL, web_prefix))
    async with (
        running_team(REDIS_URL, web_prefix),
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        created = await client.post("/api/tasks", json={"text": "Add CSV export"})
        assert created.status_code == 201
        task_id = created.json()["task_id"]
        messages, ended = await read_progress(client, f"/api/tasks/{task_id}/progress")
        detail = (await client.get(f"/api/tasks/{task_id}")).json()
    stored = await stored_progress(REDIS_URL, web_prefix, task_id)
    assert ended
    assert ids_of(messages) == [u.id for u in stored]
    assert all(m["retry"].isdigit() for m in messages)
    assert ids_of(messages) == sorted(ids_of(messages), key=id_key)
    assert messages[-1]["event"] == "end"
    assert json.loads(messages[-1]["data"])["status"] == "completed"
    assert detail["task"]["status"] == "completed"
    assert detail["percent"] == 100


async def test_progress_resumes_mid_stream(web_prefix: str) -> None:
    gate = asyncio.Event()
    app = create_app(web_settings(REDIS_URL, web_prefix))
    async with (
        running_team(REDIS_URL, web_prefix, GatedBrain(gate)),
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        created = await client.post("/api/tasks", json={"text": "Add CSV export"})
        task_id = created.json()["task_id"]
        url = f"/api/tasks/{task_id}/progress"
        before, ended_early = await read_progress(client, url, limit=2)
        gate.set()

        async def moved_on() -> bool:
            stored = await stored_progress(REDIS_URL, web_prefix, task_id)
            return len(stored) > len(before) + 2

        await eventually(moved_on, timeout=20, what="progress while away")
        after, ended = await read_progress(client, url, last_event_id=before[-1]["id"])
    stored = await stored_progress(REDIS_URL, web_prefix, task_id)
    joined = ids_of(before) + ids_of(after)
    assert not ended_early
    assert ended
    assert joined == [u.id for u in stored]
    assert len(set(joined)) == len(joined)
    assert after[-1]["event"] == "end"


async def test_progress_filter_kept_on_resume(web_prefix: str) -> None:
    gate = asyncio.Event()
    app = create_app(web_settings(REDIS_URL, web_prefix))
    async with (
        running_team(REDIS_URL, web_prefix, GatedBrain(gate)),
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        created = await client.post("/api/tasks", json={"text": "Add CSV export"})
        task_id = created.json()["task_id"]
        url = f"/api/tasks/{task_id}/progress?role=developer&role=tester"
        gate.set()
        before, _ = await read_progress(client, url, limit=2)
        after, ended = await read_progress(client, url, last_event_id=before[-1]["id"])
    stored = await stored_progress(REDIS_URL, web_prefix, task_id)
    wanted = [u.id for u in stored if u.role in ("developer", "tester") or u.final]
    joined = before + after
    assert ended
    assert ids_of(joined) == wanted
    assert {json.loads(m["data"])["role"] for m in joined[:-1]} <= {
        "developer",
        "tester",
    }
    assert joined[-1]["event"] == "end"


async def test_progress_resume_after_end(web_prefix: str) -> None:
    app = create_app(web_settings(REDIS_URL, web_prefix))
    async with (
        running_team(REDIS_URL, web_prefix),
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        created = await client.post("/api/tasks", json={"text": "Add CSV export"})
        task_id = created.json()["task_id"]
        url = f"/api/tasks/{task_id}/progress"
        first, _ = await read_progress(client, url, limit=2)
        full, _ = await read_progress(client, url)
        after, ended = await read_progress(client, url, last_event_id=first[-1]["id"])
        replay, replay_ended = await read_progress(client, url)
    assert ended
    assert ids_of(first) + ids_of(after) == ids_of(full)
    assert after[-1]["event"] == "end"
    assert replay_ended
    assert ids_of(replay) == ids_of(full)


async def test_progress_rejects_bad_cursor(web_prefix: str) -> None:
    app = create_app(web_settings(REDIS_URL, web_prefix))
    async with asgi_client(app) as client:
        task_id = await app.state.services.tasks.submit("Add CSV export")
        bad = await client.get(
            f"/api/tasks/{task_id}/progress", headers={"Last-Event-ID": "nonsense"}
        )
        missing = await client.get("/api/tasks/no-such-task/progress")
    assert bad.status_code == 400
    assert "'nonsense'" in bad.json()["detail"]
    assert missing.status_code == 404
    assert "no-such-task" in missing.json()["detail"]


async def test_task_events_form_tree(web_prefix: str) -> None:
    app = create_app(web_settings(REDIS_URL, web_prefix))
    async with (
        running_team(REDIS_URL, web_prefix),
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        created = await client.post("/api/tasks", json={"text": "Add CSV export"})
        task_id = created.json()["task_id"]
        await read_progress(client, f"/api/tasks/{task_id}/progress")
        tree = (await client.get(f"/api/tasks/{task_id}/events")).json()
        page = await client.get(f"/tasks/{task_id}")
    roots = tree["tree"]
    assert roots[0]["type"] == "team.task.submitted"
    assert roots[0]["children"]
    assert page.status_code == 200
    assert 'id="event-tree"' in page.text


async def test_live_list_streams_updates(web_prefix: str) -> None:
    app = create_app(web_settings(REDIS_URL, web_prefix))
    async with (
        running_team(REDIS_URL, web_prefix),
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
        client.stream("GET", "/api/tasks/live") as live,
    ):
        updates: list[dict[str, Any]] = []
        messages = sse_messages(live)
        ready = await anext(messages)
        created = await client.post("/api/tasks", json={"text": "Add CSV export"})
        task_id = created.json()["task_id"]
        async for message in messages:
            updates.append(json.loads(message["data"]))
            if updates[-1]["final"]:
                break
    assert ready["event"] == "ready"
    assert {u["task_id"] for u in updates} == {task_id}
    assert updates[-1]["percent"] == 100


async def test_feed_filters_by_channel(web_prefix: str) -> None:
    app = create_app(web_settings(REDIS_URL, web_prefix))
    async with (
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        bus: Bus = app.state.services.bus
        await bus.client.sadd(bus.keys.channels, "web.orders.durable")
        await bus.publish(
            "web.orders.durable", {"n": 0}, type="order", raw=True, durable=True
        )
        async with client.stream("GET", "/api/feed?channel=web.orders*") as feed:
            messages = sse_messages(feed)
            ready = await anext(messages)
            await bus.publish("web.other", {"n": 1}, type="other", raw=True)
            broadcast = await bus.publish(
                "web.orders", {"n": 2}, type="order", raw=True
            )
            durable = await bus.publish(
                "web.orders.durable", {"n": 3}, type="order", raw=True, durable=True
            )
            received = [await anext(messages), await anext(messages)]
    items = {m["id"]: json.loads(m["data"]) for m in received}
    assert json.loads(ready["data"])["filters"]["channel"] == ["web.orders*"]
    assert set(items) == {broadcast.event_id, durable.event_id}
    assert items[broadcast.event_id]["delivery"] == "broadcast"
    assert items[durable.event_id]["delivery"] == "durable"
    assert items[durable.event_id]["channel"] == "web.orders.durable"


# -- events, dead letters, breakers, contexts and prompts -------------------


async def test_event_fetch_by_id(url: str, prefix: str) -> None:
    app = create_app(web_settings(url, prefix))
    async with asgi_client(app) as client:
        bus: Bus = app.state.services.bus
        result = await bus.publish("web.orders", {"n": 1}, type="order", raw=True)
        found = await client.get(f"/api/events/{result.event_id}")
        missing = await client.get("/api/events/01NOPE")
    assert found.status_code == 200
    assert found.json()["data"] == {"n": 1}
    assert missing.status_code == 404
    assert "'01NOPE'" in missing.json()["detail"]


async def test_dead_letter_replay_redelivers(
    make_bus: Callable[..., Bus], url: str, prefix: str
) -> None:
    handled: list[str] = []
    healthy = asyncio.Event()
    worker = make_bus(service="worker")

    @worker.subscribe(
        "web.jobs", durable=True, raw=True, retry=RetryPolicy(max_attempts=1)
    )
    async def work(event: Any) -> None:
        if not healthy.is_set():
            raise RuntimeError("downstream unavailable")
        handled.append(event.id)

    app = create_app(web_settings(url, prefix))
    async with worker, asgi_client(app) as client:
        sent = await worker.publish(
            "web.jobs", {"n": 1}, type="job", raw=True, durable=True
        )
        sent_id = sent.event_id

        async def dead_lettered() -> bool:
            listed = (await client.get("/api/dlq")).json()
            return bool(listed["count"] == 1)

        await eventually(dead_lettered, what="dead letter")
        entry = (await client.get("/api/dlq")).json()["entries"][0]
        channel, stream_id = entry["id"].split("/")
        shown = await client.get(f"/api/dlq/{channel}/{stream_id}")
        healthy.set()
        replayed = await client.post(f"/api/dlq/{channel}/{stream_id}/replay")
        await eventually(lambda: handled == [sent_id], what="replayed event handled")
        left = (await client.get("/api/dlq")).json()
        again = await client.post(f"/api/dlq/{channel}/{stream_id}/replay")
    assert entry["event_id"] == sent_id
    assert shown.json()["error"] == "downstream unavailable"
    assert replayed.status_code == 200
    assert replayed.json()["event_id"] == sent_id
    assert left["count"] == 0
    assert again.status_code == 404


async def test_dead_letter_purge_all(
    make_bus: Callable[..., Bus], url: str, prefix: str
) -> None:
    worker = make_bus(service="worker")

    @worker.subscribe(
        "web.jobs", durable=True, raw=True, retry=RetryPolicy(max_attempts=1)
    )
    async def work(event: Any) -> None:
        raise RuntimeError("always fails")

    app = create_app(web_settings(url, prefix))
    async with worker, asgi_client(app) as client:
        for n in range(3):
            await worker.publish(
                "web.jobs", {"n": n}, type="job", raw=True, durable=True
            )

        async def all_dead() -> bool:
            return bool((await client.get("/api/dlq")).json()["count"] == 3)

        await eventually(all_dead, what="three dead letters")
        purged = await client.post("/api/dlq/purge", json={})
        left = (await client.get("/api/dlq")).json()
    assert purged.json() == {"purged": 3}
    assert left["count"] == 0


async def test_breakers_list_open_state(url: str, prefix: str) -> None:
    app = create_app(web_settings(url, prefix))
    async with asgi_client(app) as client:
        bus: Bus = app.state.services.bus
        breaker = bus.breaker("web-payments", BreakerConfig(failure_threshold=1))

        async def fail() -> None:
            raise ConnectionError("payments down")

        with pytest.raises(ConnectionError):
            await breaker.call(fail)
        listed = (await client.get("/api/breakers")).json()
    assert [b["name"] for b in listed] == ["web-payments"]
    assert listed[0]["state"] == "open"


async def test_context_versions_and_diff(url: str, prefix: str) -> None:
    app = create_app(web_settings(url, prefix))
    async with asgi_client(app) as client:
        manager = app.state.services.contexts
        created = await manager.create({"plan": "v1"}, owner="master")
        await manager.update(created.id, {"plan": "v2", "notes": "x"}, version=1)
        listed = (await client.get("/api/contexts")).json()
        versions = (await client.get(f"/api/contexts/{created.id}/versions")).json()
        diff = await client.get(
            f"/api/contexts/{created.id}/diff", params={"from": 1, "to": 2}
        )
        page = await client.get(f"/contexts/{created.id}")
    assert [c["id"] for c in listed] == [created.id]
    assert [v["version"] for v in versions] == [1, 2]
    assert diff.json()["changed"] == {"/plan": {"before": "v1", "after": "v2"}}
    assert diff.json()["added"] == {"/notes": "x"}
    assert page.status_code == 200
    assert 'id="diff"' in page.text


async def test_prompts_list_every_role(url: str, prefix: str) -> None:
    app = create_app(web_settings(url, prefix))
    async with asgi_client(app) as client:
        listed = (await client.get("/api/prompts")).json()
        history = (await client.get("/api/prompts/developer")).json()
        unknown = await client.get("/api/prompts/janitor")
    assert [p["role"] for p in listed] == ["master", "pm", "developer", "ux", "tester"]
    assert history["versions"][0]["version"] == 1
    assert history["versions"][0]["reason"]
    assert unknown.status_code == 400
    assert "'janitor'" in unknown.json()["detail"]


# -- access control ---------------------------------------------------------


async def test_token_required_for_requests(url: str, prefix: str) -> None:
    app = create_app(web_settings(url, prefix), token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with asgi_client(app) as client:
        anonymous = await client.get("/api/dlq")
        wrong = await client.get("/api/dlq", headers={"Authorization": "Bearer nope"})
        allowed = await client.get("/api/dlq", headers=bearer)
        purge = await client.post("/api/dlq/purge", json={})
        metrics = await client.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert wrong.status_code == 401
    assert allowed.status_code == 200
    assert purge.status_code == 401
    assert metrics.status_code == 401


async def test_login_cookie_opens_pages(url: str, prefix: str) -> None:
    app = create_app(web_settings(url, prefix), token=TOKEN)
    html = {"Accept": "text/html"}
    async with asgi_client(app) as client:
        redirected = await client.get("/dlq", headers=html)
        failed = await client.post("/login", data={"token": "nope", "next": "/dlq"})
        login = await client.post("/login", data={"token": TOKEN, "next": "/dlq"})
        page = await client.get("/dlq", headers=html)
        api = await client.get("/api/dlq")
    assert redirected.status_code == 303
    assert redirected.headers["location"] == "/login?next=/dlq"
    assert failed.status_code == 401
    assert login.status_code == 303
    assert TOKEN not in login.headers["set-cookie"]
    assert page.status_code == 200
    assert api.status_code == 200


async def test_cross_origin_post_rejected(url: str, prefix: str) -> None:
    app = create_app(web_settings(url, prefix))
    async with asgi_client(app) as client:
        foreign = await client.post(
            "/api/dlq/purge", json={}, headers={"Origin": "http://evil.example"}
        )
        own = await client.post(
            "/api/dlq/purge", json={}, headers={"Origin": "http://127.0.0.1"}
        )
        rebound = await client.get("/api/dlq", headers={"Host": "evil.example"})
    assert foreign.status_code == 403
    assert own.status_code == 200
    assert rebound.status_code == 400


async def test_openapi_lists_routes(url: str, prefix: str) -> None:
    app = create_app(web_settings(url, prefix))
    async with asgi_client(app) as client:
        schema = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    assert "/api/tasks/{task_id}/progress" in schema["paths"]
    assert "/api/dlq/{channel}/{entry_id}/replay" in schema["paths"]
    assert docs.status_code == 200
