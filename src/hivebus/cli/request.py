"""The ``request`` command: send one request to a service and print the response."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from hivebus.cli.common import (
    EXIT_ERROR,
    PrefixOption,
    RedisOption,
    app,
    errors,
    make_bus,
    run,
)


@app.command()
def request(
    service: Annotated[str, typer.Argument(help="Service that handles the request.")],
    request_type: Annotated[
        str, typer.Argument(metavar="TYPE", help="Request event type.")
    ],
    data: Annotated[
        str, typer.Option("--data", "-d", help="Request data as a JSON document.")
    ] = "{}",
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.001, help="Seconds to wait for the response."),
    ] = 10.0,
    redis: RedisOption = "memory://",
    prefix: PrefixOption = "hivebus",
) -> None:
    """Send a request and print the response as JSON.

    Exits with 1 when the request times out or the responder raises.
    """
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        errors.print(
            f"error: --data is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}): {data!r}; quote it for the shell, as in "
            '--data \'{"key": "value"}\'',
            markup=False,
            highlight=False,
        )
        raise typer.Exit(EXIT_ERROR) from None
    bus = make_bus(redis, prefix, service="hivebus-cli")

    async def go() -> Any:
        try:
            return await bus.request(
                service, request_type, payload, timeout=timeout, raw=True
            )
        finally:
            await bus.stop()

    response = run(go)
    if isinstance(response, BaseModel):
        response = response.model_dump(mode="json")
    print(json.dumps(response), flush=True)
