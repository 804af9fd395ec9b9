"""The ``dashboard`` command: serve the web dashboard and HTTP API."""

from __future__ import annotations

import ipaddress
import logging
from typing import Annotated

import typer

from hivebus.bus import Bus
from hivebus.cli.common import (
    EXIT_ERROR,
    EXIT_USAGE,
    PrefixOption,
    RedisOption,
    app,
    errors,
    run,
)
from hivebus.config import Settings
from hivebus.web.auth import LOOPBACK_HOSTS

logger = logging.getLogger(__name__)


@app.command()
def dashboard(
    host: Annotated[
        str,
        typer.Option(
            "--host",
            envvar="HIVEBUS_DASHBOARD_HOST",
            help="Address to bind. Anything but a loopback address needs --token.",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            "--port", envvar="HIVEBUS_DASHBOARD_PORT", help="TCP port to listen on."
        ),
    ] = 8700,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="HIVEBUS_DASHBOARD_TOKEN",
            help="Token that every request must carry (Bearer header or login).",
        ),
    ] = None,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Serve the dashboard and HTTP API (docs at /docs, metrics at /metrics)."""
    from hivebus.web import create_app
    from hivebus.web.server import serve

    loopback = _is_loopback(host)
    if not loopback and not token:
        errors.print(
            f"error: --host {host} is reachable from other machines; set --token "
            "(or HIVEBUS_DASHBOARD_TOKEN) so that requests need it",
            markup=False,
        )
        raise typer.Exit(EXIT_USAGE)
    try:
        settings = Settings(redis_url=redis, prefix=prefix, service="hivebus-dashboard")
    except ValueError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    run(lambda: _check_redis(settings))
    hosts = LOOPBACK_HOSTS if loopback else None
    web_app = create_app(settings, token or "", allowed_hosts=hosts)
    url = f"http://{_url_host(host)}:{port}/"
    if not serve(
        web_app,
        host,
        port,
        lambda: errors.print(f"dashboard on {url}", highlight=False),
    ):
        # uvicorn has logged why: the port is taken, or startup failed.
        raise typer.Exit(EXIT_ERROR)


async def _check_redis(settings: Settings) -> None:
    """Connect once, so an unreachable Redis ends the command with one line."""
    bus = Bus(settings=settings)
    try:
        await bus.connect()
    finally:
        await bus.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
