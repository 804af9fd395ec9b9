"""Objects the routes share: the bus, the feed, the templates and the stores."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.templating import Jinja2Templates

from hivebus.bus import Bus
from hivebus.context.manager import ContextManager
from hivebus.team.client import TaskClient
from hivebus.web.feed import Feed

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass(slots=True)
class Services:
    """The app's long-lived objects, built at startup."""

    bus: Bus
    token: str | None
    templates: Jinja2Templates
    feed: Feed = field(init=False)
    contexts: ContextManager = field(init=False)
    tasks: TaskClient = field(init=False)

    def __post_init__(self) -> None:
        self.feed = Feed(self.bus)
        self.contexts = ContextManager(self.bus)
        self.tasks = TaskClient(self.bus)

    async def close(self) -> None:
        """Stop the feed readers and write the context counters."""
        await self.feed.close()
        await self.contexts.close()


def services(request: Request) -> Services:
    """Return the app's services (a FastAPI dependency)."""
    found: Services = request.app.state.services
    return found


def make_templates() -> Jinja2Templates:
    """Return the page templates, with filters for times and JSON."""
    templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
    templates.env.filters["ms_time"] = format_ms
    templates.env.filters["pretty_json"] = pretty_json
    return templates


def format_ms(value: int | float | str | None) -> str:
    """Return epoch milliseconds as an ISO time in UTC, or an empty string."""
    if not value:
        return ""
    moment = datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty_json(value: Any) -> str:
    """Return ``value`` as indented JSON."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)
