"""Model server failures as the chat brain classes them, and its circuit breaker.

A response is usable (200), worth a retry after a backoff (5xx, timeout,
connection failure), or a rejection that no retry fixes (spent quota,
rejected credentials). Other 4xx responses go back to the brain, which may
change the request and send it again. Every request passes the brain's
circuit breaker, and a spent quota opens that breaker at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from hivebus.breaker import CircuitBreaker
from hivebus.errors import BreakerOpenError
from hivebus.team.chat_api import ServerError, server_error


class UnavailableError(Exception):
    """5xx, timeout or connection failure: worth a retry after a backoff."""


class PermanentError(Exception):
    """Quota spent or credentials rejected: a breaker failure, never retried."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(error.describe())
        self.error = error


class ContextTooLongError(Exception):
    """The server reported that the request exceeds the model's context window."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(error.describe())
        self.error = error


async def send_through(
    breaker: CircuitBreaker | None, send: Callable[[], Awaitable[httpx.Response]]
) -> httpx.Response:
    """Run ``send`` through ``breaker`` like ``CircuitBreaker.call``, and return it.

    The one difference: a ``PermanentError`` for a spent quota opens the
    breaker at once. The quota belongs to the account, so every later request
    would fail the same way until someone adds credit, and the breaker's
    probe after its cool-down finds out when that happened.
    """
    if breaker is None:
        return await send()
    permit = await breaker.acquire()
    if not permit.allowed:
        raise BreakerOpenError(breaker.name, permit.retry_after)
    try:
        response = await send()
    except asyncio.CancelledError:
        await asyncio.shield(breaker.release(permit))
        raise
    except breaker.config.excluded:
        await breaker.record(permit, success=True)
        raise
    except PermanentError as exc:
        await breaker.record(permit, success=False, trip=exc.error.is_quota)
        raise
    except Exception:
        await breaker.record(permit, success=False)
        raise
    await breaker.record(permit, success=True)
    return response


def classify(response: httpx.Response, body: dict[str, Any]) -> httpx.Response:
    """Raise for responses that count as a server failure; return the others."""
    status = response.status_code
    if status >= 500:
        error = server_error(response)
        if "response_format" in body and rejects_response_format(error):
            return response  # a permanent mismatch, handled by dropping the field
        raise UnavailableError(error.describe())
    if status in (401, 402, 403):
        raise PermanentError(server_error(response))
    if status == 429 and server_error(response).is_quota:
        raise PermanentError(server_error(response))
    return response


def rejects_response_format(error: ServerError) -> bool:
    """Tell whether an error response reports structured output as unsupported."""
    if error.status not in (400, 422, 500, 501):
        return False
    return error.names("response_format") or error.names("json_schema")


def rejected_message(base_url: str, model: str, error: ServerError) -> str:
    """Return the error text for a request the server rejected, with what to change."""
    return (
        f"model server {base_url} rejected the request: {error.describe()}; "
        f"{_hint(model, error)}"
    )


def _hint(model: str, error: ServerError) -> str:
    if error.is_quota:
        return (
            "the account's quota or credit is used up: add credit, or point "
            "HIVEBUS_BRAIN_URL and HIVEBUS_BRAIN_API_KEY at another account"
        )
    if error.status in (401, 403):
        return "check HIVEBUS_BRAIN_API_KEY"
    if error.status == 404:
        return (
            "check HIVEBUS_BRAIN_URL (the API base, often ending in /v1) and "
            f"HIVEBUS_BRAIN_MODEL ({model!r})"
        )
    if error.is_context_length:
        return "set HIVEBUS_BRAIN_CONTEXT_WINDOW to the model's real window"
    return (
        f"check HIVEBUS_BRAIN_MODEL ({model!r}), or set "
        "HIVEBUS_BRAIN_RESPONSE_FORMAT=false if the server rejects "
        "structured output"
    )
