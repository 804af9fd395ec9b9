"""The ``hivebus`` command line: one module per command group."""

from __future__ import annotations

from hivebus.cli import (  # noqa: F401 - importing registers the commands
    context,
    dashboard,
    demo,
    dlq,
    errors,
    events,
    prompts,
    request,
    team,
)
from hivebus.cli.common import app


def main() -> None:
    """Run the command line."""
    app()


__all__ = ["app", "main"]
