"""The ``hivebus`` command line.

Every option can also be set by an environment variable named in its help
(``HIVEBUS_REDIS_URL`` and so on). Exit codes are the constants below.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler

from hivebus import __version__
from hivebus.bus import Bus
from hivebus.config import Settings
from hivebus.errors import HivebusError
from hivebus.events import Event

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1  # the command failed: bad input, a missing id, Redis unreachable
EXIT_USAGE = 2  # the command line itself is wrong (typer's own code)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C, as shells report SIGINT

app = typer.Typer(
    name="hivebus",
    help="An event bus on Redis for teams of services and AI agents.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,  # locals may hold passwords and tokens
)

console = Console()
# soft_wrap: messages keep their lines when piped, so they can be searched.
errors = Console(stderr=True, soft_wrap=True)

RedisOption = Annotated[
    str,
    typer.Option(
        "--redis",
        envvar="HIVEBUS_REDIS_URL",
        help="Redis URL: redis://, rediss:// (TLS) or memory:// (in-process).",
    ),
]
PrefixOption = Annotated[
    str,
    typer.Option(
        "--prefix", envvar="HIVEBUS_PREFIX", help="Namespace put in front of every key."
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON instead of a table.")
]


def _version(value: bool) -> None:
    if value:
        console.print(f"hivebus {__version__} (Python {sys.version.split()[0]})")
        raise typer.Exit(EXIT_OK)


@app.callback()
def main_options(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, help="Log more: -v for INFO, -vv for DEBUG."
        ),
    ] = 0,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Set up logging for every command."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        handlers=[_log_handler()],
    )


def _log_handler() -> logging.Handler:
    """Return a rich handler for a terminal, and plain lines for files and pipes."""
    if errors.is_terminal:
        return RichHandler(console=errors, show_path=False)
    return logging.StreamHandler(sys.stderr)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning hivebus errors into a message and exit code 1."""
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except HivebusError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


def make_bus(redis: str, prefix: str, **overrides: Any) -> Bus:
    """Build a bus from the common options."""
    try:
        settings = Settings(redis_url=redis, prefix=prefix, **overrides)
    except ValidationError as exc:
        for line in describe_invalid_settings(exc):
            errors.print(f"error: {line}", markup=False, highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    return Bus(settings=settings)


def describe_invalid_settings(exc: ValidationError) -> list[str]:
    """Return one line per invalid setting, naming its environment variable."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"invalid `{name}` (HIVEBUS_{name.upper()}): {message}")
    return lines


def print_event(event: Event[Any], as_json: bool) -> None:
    """Print one event as a JSON line or a readable block."""
    if as_json:
        print(event.model_dump_json(exclude_none=True), flush=True)
        return
    console.print(
        f"[bold]{event.type}[/bold] id={event.id} source={event.source} "
        f"time={event.time.isoformat()}",
        highlight=False,
    )
    console.print_json(json.dumps(event.model_dump(mode="json")["data"]))


def parse_duration(text: str) -> float:
    """Return the seconds in ``30s``, ``15m``, ``12h`` or ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.replace(".", "", 1).isdigit():
        errors.print(
            f"error: invalid duration {text!r}: use a number and a unit, as in 30s, "
            "15m, 12h or 7d",
            markup=False,
        )
        raise typer.Exit(EXIT_USAGE)
    return float(number) * units[unit]
