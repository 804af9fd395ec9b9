"""The ``hivebus`` command line: one module per command group."""

from __future__ import annotations

from hivebus.cli import demo, dlq, events  # noqa: F401 - importing registers the commands
from hivebus.cli.common import app


def main() -> None:
    """Run the command line."""
    app()


__all__ = ["app", "main"]
