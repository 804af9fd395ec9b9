"""The dashboard and HTTP API as one FastAPI application.

``create_app`` returns the app; ``hivebus dashboard`` serves it with
uvicorn. The app owns one ``Bus`` (connected at startup, stopped at
shutdown) that every route shares. JSON routes live under ``/api`` and are
described at ``/docs`` (OpenAPI); the pages are server-rendered templates
with a little JavaScript, and ``/metrics`` serves Prometheus text.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hivebus import __version__, metrics
from hivebus.bus import Bus
from hivebus.config import Settings
from hivebus.errors import (
    ConfigError,
    ContextError,
    ContextNotFoundError,
    DeadLetterNotFoundError,
    EventNotFoundError,
    HivebusError,
    InvalidEventError,
    PromptError,
    PromptNotFoundError,
    RedisUnavailableError,
    TaskError,
    TaskNotFoundError,
)
from hivebus.web import (
    api_breakers,
    api_contexts,
    api_dlq,
    api_events,
    api_prompts,
    api_tasks,
    pages,
    stats,
)
from hivebus.web.auth import LOOPBACK_HOSTS, Guard, check_token
from hivebus.web.services import Services, make_templates

logger = logging.getLogger(__name__)

TOKEN_ENV = "HIVEBUS_DASHBOARD_TOKEN"
STATIC_DIR = Path(__file__).parent / "static"
ERROR_STATUS: tuple[tuple[type[HivebusError], int], ...] = (
    (EventNotFoundError, 404),
    (DeadLetterNotFoundError, 404),
    (TaskNotFoundError, 404),
    (ContextNotFoundError, 404),
    (PromptNotFoundError, 404),
    (InvalidEventError, 400),
    (ContextError, 400),
    (PromptError, 400),
    (ConfigError, 400),
    (TaskError, 409),
    (RedisUnavailableError, 503),
)


def create_app(
    bus_settings: Settings,
    token: str | None = None,
    *,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
) -> FastAPI:
    """Build the dashboard and API for the bus that ``bus_settings`` describes.

    Args:
        token: the token every request must carry; None reads it from
            ``HIVEBUS_DASHBOARD_TOKEN``, and an empty value means none.
        allowed_hosts: host names accepted in the ``Host`` header, or None
            (or a list with ``"*"``) for any. The default allows only loopback
            names, which fits a server bound to 127.0.0.1.
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    token = check_token(token) if token else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bus = Bus(settings=bus_settings)
        await bus.connect()
        services = Services(bus=bus, token=token, templates=make_templates())
        app.state.services = services
        logger.info(
            "dashboard ready prefix=%s token=%s",
            bus_settings.prefix,
            "required" if token else "none",
        )
        try:
            yield
        finally:
            await services.close()
            await bus.stop()

    app = FastAPI(
        title="hivebus",
        version=__version__,
        summary="Tasks, events, dead letters, contexts, prompts and breakers.",
        lifespan=lifespan,
    )
    for router in (
        api_tasks.router,
        api_events.router,
        api_dlq.router,
        api_contexts.router,
        api_prompts.router,
        api_breakers.router,
        stats.router,
        pages.router,
    ):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(HivebusError, _hivebus_error)  # type: ignore[arg-type]
    app.add_middleware(Guard, token=token, allowed_hosts=allowed_hosts)
    app.add_middleware(RequestTimer)
    return app


async def _hivebus_error(request: Request, exc: HivebusError) -> Response:
    status = next((code for kind, code in ERROR_STATUS if isinstance(exc, kind)), 500)
    if status >= 500:
        logger.error("request failed path=%s error=%r", request.url.path, exc)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": str(exc)}, status_code=status)
    return pages.error_page(request, status, str(exc))


class RequestTimer:
    """ASGI middleware that records each request's time to its response headers.

    A server-sent event stream counts until its headers are sent, not for as
    long as it stays open.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                seconds = time.perf_counter() - start
                metrics.observe_request(
                    scope["method"], path, message["status"], seconds
                )
            await send(message)

        await self.app(scope, receive, timed_send)
