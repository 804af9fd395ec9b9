"""Serve the dashboard app with uvicorn and tell when it accepts connections."""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp


class AnnouncingServer(uvicorn.Server):
    """A uvicorn server that calls ``on_started`` once its sockets listen."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started()


def serve(app: ASGIApp, host: str, port: int, on_started: Callable[[], None]) -> bool:
    """Serve ``app`` until stopped; return False if it never started serving."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False
    )
    server = AnnouncingServer(config, on_started)
    server.run()
    return server.started
