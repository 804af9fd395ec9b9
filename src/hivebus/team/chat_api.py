"""The OpenAI chat-completions wire format: request bodies, replies, error responses.

Servers that offer this API differ in details, so the readers here accept
the common variants. Content may be a string or a list of text parts, and
usage may be missing (it is then estimated). Errors may come as
``{"error": {...}}`` (OpenAI), ``{"error": "text"}`` (Ollama), a flat
object (vLLM) or ``{"detail": ...}``.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel

from hivebus.team.brain import Rejection, Usage, estimate_tokens
from hivebus.team.replies import Completion

MAX_ERROR_CHARS = 500
MAX_REJECTED_REPLY_CHARS = 2000  # of a rejected reply, echoed back to the model

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class ServerError:
    """The parts of a server's error response that decide what to do next."""

    status: int
    message: str
    code: str = ""
    type: str = ""
    param: str = ""

    @property
    def is_quota(self) -> bool:
        """Whether the account's quota or credit is spent (no retry helps)."""
        words = f"{self.code} {self.type}".lower()
        return self.status == 402 or "insufficient_quota" in words

    @property
    def is_context_length(self) -> bool:
        """Whether the server reports the request as longer than the model's window."""
        text = f"{self.code} {self.message}".lower()
        needles = ("context_length", "context length", "maximum context", "too long")
        return self.status in (400, 413, 422) and any(n in text for n in needles)

    def names(self, field: str) -> bool:
        """Tell whether the error's ``param`` or message mentions ``field``."""
        return field in f"{self.param} {self.message}".lower()

    def describe(self) -> str:
        """Return the status, code and message as one line for errors and logs."""
        code = f" {self.code}" if self.code else ""
        return f"HTTP {self.status}{code}: {self.message}"


def response_format(schema: type[BaseModel]) -> dict[str, Any]:
    """Return the ``response_format`` field that requests JSON fitting ``schema``."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": schema.__name__[:64],
            "schema": schema.model_json_schema(),
            "strict": False,
        },
    }


def correction(reply: str, rejection: Rejection) -> list[Message]:
    """Return the messages that show the model its rejected reply and the error."""
    echoed = reply[:MAX_REJECTED_REPLY_CHARS]
    if len(reply) > len(echoed):
        echoed += "\n[... rest of the reply not shown]"
    if rejection.kind == "truncated":
        advice = "Reply again with a shorter JSON object that fits the schema."
    else:
        advice = "Reply again with only a JSON object that fits the schema."
    text = f"Your reply was rejected ({rejection.kind}): {rejection.detail}\n{advice}"
    return [
        {"role": "assistant", "content": echoed},
        {"role": "user", "content": text},
    ]


def read_completion(response: httpx.Response, messages: list[Message]) -> Completion:
    """Return the first choice's text, finish reason and usage.

    Usage the server did not report is estimated from the characters sent
    and received, and marked as an estimate. A body without choices is
    kept as the reply text, so that the reply check rejects it.
    """
    try:
        data = response.json()
        choice = data["choices"][0]
        text = _content(choice.get("message") or {})
        finish = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        data, text, finish = {}, response.text, None
    usage = _usage(data.get("usage") if isinstance(data, dict) else None)
    if usage is None:
        prompt = sum(estimate_tokens(m["content"]) for m in messages)
        usage = Usage(prompt, estimate_tokens(text), estimated=True)
    return Completion(text=text, finish_reason=finish, usage=usage)


def server_error(response: httpx.Response) -> ServerError:
    """Return the status, message, code, type and param of an error response."""
    try:
        data = response.json()
    except ValueError:
        data = None
    inner = data.get("error", data) if isinstance(data, dict) else None
    if isinstance(inner, str):
        return ServerError(response.status_code, inner[:MAX_ERROR_CHARS])
    if not isinstance(inner, dict):
        text = response.text[:MAX_ERROR_CHARS] or "no body"
        return ServerError(response.status_code, text)
    message = inner.get("message") or inner.get("detail") or json.dumps(inner)
    return ServerError(
        status=response.status_code,
        message=str(message)[:MAX_ERROR_CHARS],
        code=str(inner.get("code") or ""),
        type=str(inner.get("type") or ""),
        param=str(inner.get("param") or ""),
    )


def retry_after(response: httpx.Response) -> float | None:
    """Return the seconds a 429 response requests as its wait, or ``None``.

    Reads ``retry-after-ms`` (milliseconds), then ``Retry-After``, which may
    be seconds or an HTTP date. ``None`` means neither header is usable.
    """
    millis = response.headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        parts = [part.get("text", "") for part in content if isinstance(part, dict)]
        return "".join(str(part) for part in parts)
    return "" if content is None else str(content)


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)
