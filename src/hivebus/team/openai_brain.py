"""A brain that calls an OpenAI-compatible chat-completions API over HTTP.

It works with vLLM, the llama.cpp server, Ollama and hosted APIs. Each call
POSTs ``{base_url}/chat/completions`` with the model and two messages. The
system message is the role's prompt plus the JSON schema of the expected
output. The user message is the ask's prompt, trimmed to the context window
by the rule in ``hivebus.team.window``. Unless turned off, the request also
carries ``response_format`` with that schema.

A reply that is not JSON, does not fit the model or was cut off at the
token limit is rejected (see ``hivebus.team.replies``), and the model is
asked again with the error in the request, up to ``max_attempts`` replies.

Server trouble is handled apart from bad replies:

- 429 with Retry-After: wait that long (at most ``max_retry_after``), and
  send nothing else to that server from this process meanwhile. The wait
  costs no reply attempt.
- ``insufficient_quota``, 401, 403, 404 and other 4xx: no retry; the error
  quotes the server and names the setting to change.
- A 400 (or 500) that names ``response_format`` as unsupported: stop
  sending it to that server for the rest of the process and retry once. A
  400 asking for ``max_completion_tokens`` switches to that field.
- A 400 saying the context is too long: retry once with half the prompt.
- 5xx, timeouts and connection errors: ``server_retries`` requests with
  exponential backoff, then ``BrainServerError``.
- Every request goes through the optional circuit breaker. 5xx, timeouts,
  quota and authentication errors count as its failures. A spent quota
  opens it at once, because every later request would fail the same way.
  While it is open, calls fail at once with ``BreakerOpenError``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from hivebus import __version__
from hivebus.breaker import CircuitBreaker
from hivebus.connection import Backoff
from hivebus.errors import BrainError, BrainReplyError, BrainServerError
from hivebus.team.brain import (
    CHARS_PER_TOKEN,
    Ask,
    ModelT,
    Rejection,
    Thought,
    Usage,
    estimate_tokens,
)
from hivebus.team.chat_api import (
    Message,
    ServerError,
    correction,
    read_completion,
    response_format,
    retry_after,
    server_error,
)
from hivebus.team.chat_faults import (
    ContextTooLongError,
    PermanentError,
    UnavailableError,
    classify,
    rejected_message,
    rejects_response_format,
    send_through,
)
from hivebus.team.replies import Completion, ReplyRejectedError, parse_reply
from hivebus.team.window import fit_prompt

if TYPE_CHECKING:
    from hivebus.team.config import TeamSettings

logger = logging.getLogger(__name__)

FRAMING_TOKENS = 64  # message roles, separators and the chat template's own text
MAX_RATE_LIMIT_WAITS = 10  # 429 responses in a row for one reply before giving up
MIN_PROMPT_TOKENS = 256  # a window that leaves the user prompt less is refused


@dataclass
class _ServerQuirks:
    """Request fields one server rejected, and its rate-limit pause."""

    response_format: bool = True
    max_tokens_field: str = "max_tokens"
    paused_until: float = 0.0  # time.monotonic() before which nothing is sent


# One entry per base URL for the life of the process, shared by every brain
# instance, so that each process learns a server's limits once.
_QUIRKS: dict[str, _ServerQuirks] = {}


class OpenAIBrain:
    """A brain backed by an OpenAI-compatible chat-completions server."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_attempts: int = 3,
        response_format: bool = True,
        context_window: int = 8192,
        max_tokens: int = 1024,
        server_retries: int = 3,
        max_retry_after: float = 60.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        breaker: CircuitBreaker | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"{model}@{urlsplit(self.base_url).netloc or self.base_url}"
        self.max_attempts = max_attempts
        self.response_format = response_format
        self.context_window = context_window
        self.max_tokens = max_tokens
        self.server_retries = server_retries
        self.max_retry_after = max_retry_after
        self.breaker = breaker
        self._timeout = timeout
        self._backoff = (backoff_base, backoff_cap)
        self._quirks = _QUIRKS.setdefault(self.base_url, _ServerQuirks())
        headers = {"User-Agent": f"hivebus/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers=headers,
            transport=transport,
        )

    @classmethod
    def from_settings(
        cls, settings: TeamSettings, *, breaker: CircuitBreaker | None = None
    ) -> OpenAIBrain:
        """Build a brain from ``TeamSettings``; ``brain_url`` and model must be set."""
        if settings.brain_url is None or settings.brain_model is None:
            msg = "OpenAIBrain needs HIVEBUS_BRAIN_URL and HIVEBUS_BRAIN_MODEL"
            raise BrainError(msg)
        key = settings.brain_api_key
        return cls(
            settings.brain_url,
            settings.brain_model,
            api_key=key.get_secret_value() if key is not None else None,
            timeout=settings.brain_timeout,
            max_attempts=settings.brain_max_attempts,
            response_format=settings.brain_response_format,
            context_window=settings.brain_context_window,
            max_tokens=settings.brain_max_tokens,
            server_retries=settings.brain_server_retries,
            max_retry_after=settings.brain_max_retry_after,
            breaker=breaker,
        )

    def __repr__(self) -> str:
        return f"OpenAIBrain(base_url={self.base_url!r}, model={self.model!r})"

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    # -- one call: replies until one fits --------------------------------

    async def think(self, ask: Ask[ModelT]) -> Thought[ModelT]:
        """Ask the model until a reply fits ``ask.schema``, and return it.

        Raises ``BrainReplyError`` after ``max_attempts`` unusable replies,
        ``BrainServerError`` when the server refuses or keeps failing, and
        ``BreakerOpenError`` when the breaker rejects a request. A raised
        ``BrainError`` carries the usage and rejections of the call so far.
        """
        usage = Usage()
        rejections: list[Rejection] = []
        notes: list[str] = []
        share = 1.0  # of the prompt budget, halved once on a context-length error
        retry: tuple[str, Rejection] | None = None
        try:
            while len(rejections) < self.max_attempts:
                messages = self._messages(ask, share, retry, notes)
                try:
                    completion = await self._complete(ask, messages, notes)
                except ContextTooLongError as exc:
                    share = self._shrink(share, exc.error, notes)
                    continue
                usage = usage + completion.usage
                try:
                    value = parse_reply(completion, ask.schema)
                except ReplyRejectedError as exc:
                    rejections.append(exc.rejection)
                    self._log_rejection(ask, exc.rejection, len(rejections))
                    retry = (completion.text, exc.rejection)
                    continue
                calls = len(rejections) + 1
                return Thought(value, usage, calls, tuple(rejections), tuple(notes))
            last = rejections[-1]
            msg = (
                f"the model {self.model!r} gave no usable {ask.schema.__name__} for "
                f"role {ask.role} in {self.max_attempts} replies; last error "
                f"({last.kind}): {last.detail}. Raise HIVEBUS_BRAIN_MAX_ATTEMPTS or "
                "use a model that follows JSON schemas better"
            )
            raise BrainReplyError(msg)
        # NOTE: a BreakerOpenError raised after a rejected reply carries no
        # usage, so the tokens of that reply go uncounted.
        except BrainError as exc:
            exc.usage = usage if usage.total else exc.usage
            exc.rejections = tuple(rejections)
            raise

    def _shrink(self, share: float, error: ServerError, notes: list[str]) -> float:
        if share < 1.0:
            msg = (
                f"model server {self.base_url} reported the request as too long for "
                f"the model even with the prompt trimmed to half ({error.describe()}); "
                "set HIVEBUS_BRAIN_CONTEXT_WINDOW to the model's real context window"
            )
            raise BrainServerError(msg)
        notes.append(
            f"server reported the context as too long ({error.message}); "
            "retried with half the prompt budget"
        )
        logger.warning(
            "model server reported context length exceeded, retrying with half the "
            "prompt server=%s window=%d",
            self.base_url,
            self.context_window,
        )
        return 0.5

    def _log_rejection(self, ask: Ask[Any], rejection: Rejection, count: int) -> None:
        logger.info(
            "brain reply rejected kind=%s role=%s task=%s story=%s attempt=%d/%d "
            "detail=%s",
            rejection.kind,
            ask.role,
            ask.task_id,
            ask.story_key or "-",
            count,
            self.max_attempts,
            rejection.detail[:300],
        )

    # -- building the request --------------------------------------------

    def _system(self, ask: Ask[Any]) -> str:
        schema = json.dumps(ask.schema.model_json_schema(), separators=(",", ":"))
        return (
            f"{ask.system}\n\nReply with one JSON object, and nothing else, that "
            f"fits this JSON schema:\n{schema}"
        )

    def _messages(
        self,
        ask: Ask[Any],
        share: float,
        retry: tuple[str, Rejection] | None,
        notes: list[str],
    ) -> list[Message]:
        system = self._system(ask)
        extra = correction(*retry) if retry is not None else []
        budget = math.floor(self._prompt_budget(ask, system, extra) * share)
        prompt, cuts = fit_prompt(ask.prompt, budget * CHARS_PER_TOKEN)
        # Counted as sent, JSON escapes included, so that servers or proxies
        # that count characters agree; a prompt full of JSON is cut again.
        excess = _sent_tokens(prompt) - budget
        if excess > 0:
            smaller = (budget - excess) * CHARS_PER_TOKEN
            prompt, cuts = fit_prompt(ask.prompt, max(smaller, 0))
        for cut in cuts:
            note = f"{cut} to fit brain_context_window={self.context_window}"
            if note not in notes:
                notes.append(note)
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": prompt},
            *extra,
        ]

    def _prompt_budget(self, ask: Ask[Any], system: str, extra: list[Message]) -> int:
        """Return the tokens left for the user prompt; raise if too few are."""
        used = _sent_tokens(system) + sum(_sent_tokens(m["content"]) for m in extra)
        if self._sends_response_format():
            used += estimate_tokens(json.dumps(ask.schema.model_json_schema()))
        budget = self.context_window - self.max_tokens - FRAMING_TOKENS - used
        if budget < MIN_PROMPT_TOKENS:
            msg = (
                f"the system prompt and schema of role {ask.role} leave {budget} "
                f"tokens of the {self.context_window}-token context window for the "
                "input; raise HIVEBUS_BRAIN_CONTEXT_WINDOW or lower "
                "HIVEBUS_BRAIN_MAX_TOKENS"
            )
            raise BrainError(msg)
        return budget

    def _sends_response_format(self) -> bool:
        return self.response_format and self._quirks.response_format

    def _body(self, ask: Ask[Any], messages: list[Message]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            self._quirks.max_tokens_field: self.max_tokens,
        }
        if self._sends_response_format():
            body["response_format"] = response_format(ask.schema)
        return body

    # -- one reply: requests until the server responds -------------------

    async def _complete(
        self, ask: Ask[Any], messages: list[Message], notes: list[str]
    ) -> Completion:
        backoff = Backoff(*self._backoff)
        failures = rate_limits = 0
        adapted: set[str] = set()
        while True:
            body = self._body(ask, messages)
            await self._wait_for_pause()
            try:
                response = await self._send(ask, body)
            except UnavailableError as exc:
                failures += 1
                await self._after_failure(ask, exc, failures, backoff)
                continue
            except PermanentError as exc:
                raise BrainServerError(
                    rejected_message(self.base_url, self.model, exc.error)
                ) from None
            if response.status_code == 200:
                return read_completion(response, messages)
            error = server_error(response)
            adaptation = self._adapt(error, body)
            if adaptation is not None and adaptation not in adapted:
                adapted.add(adaptation)
                notes.append(adaptation)
                continue
            if error.status == 429 and not error.is_quota:
                rate_limits += 1
                self._pause(ask, response, error, rate_limits)
                continue
            if error.is_context_length:
                raise ContextTooLongError(error)
            raise BrainServerError(rejected_message(self.base_url, self.model, error))

    async def _send(self, ask: Ask[Any], body: dict[str, Any]) -> httpx.Response:
        headers = {"X-Hivebus-Role": ask.role, "X-Hivebus-Task": ask.task_id}

        async def post() -> httpx.Response:
            url = f"{self.base_url}/chat/completions"
            try:
                response = await self._http.post(url, json=body, headers=headers)
            except httpx.TimeoutException as exc:
                msg = f"no reply within {self._timeout:.1f}s ({type(exc).__name__})"
                raise UnavailableError(msg) from exc
            except httpx.RequestError as exc:
                msg = f"request failed: {type(exc).__name__}: {exc}"
                raise UnavailableError(msg) from exc
            return classify(response, body)

        return await send_through(self.breaker, post)

    async def _after_failure(
        self, ask: Ask[Any], exc: UnavailableError, failures: int, backoff: Backoff
    ) -> None:
        if failures >= self.server_retries:
            msg = (
                f"model server {self.base_url} failed {failures} requests in a row "
                f"for role {ask.role}; last error: {exc}. Check that the server is "
                "up, or raise HIVEBUS_BRAIN_TIMEOUT if it is slow"
            )
            raise BrainServerError(msg) from exc
        delay = backoff.next_delay()
        logger.warning(
            "model server request failed, retrying server=%s role=%s task=%s "
            "attempt=%d/%d delay=%.2fs error=%s",
            self.base_url,
            ask.role,
            ask.task_id,
            failures,
            self.server_retries,
            delay,
            exc,
        )
        await asyncio.sleep(delay)

    def _adapt(self, error: ServerError, body: dict[str, Any]) -> str | None:
        """Change what is sent to a server that rejected a field; return a note."""
        if "response_format" in body and rejects_response_format(error):
            if self._quirks.response_format:
                self._quirks.response_format = False
                logger.warning(
                    "model server rejected a request field, sending requests "
                    "without it from now on server=%s field=response_format "
                    "error=%s",
                    self.base_url,
                    error.describe(),
                )
            return "server rejected response_format; sent requests without it"
        sent_max_tokens = "max_tokens" in body
        if error.status == 400 and sent_max_tokens and error.names("max_completion"):
            if self._quirks.max_tokens_field == "max_tokens":
                self._quirks.max_tokens_field = "max_completion_tokens"
                logger.warning(
                    "model server asked for another request field, switching "
                    "server=%s field=max_tokens to=max_completion_tokens",
                    self.base_url,
                )
            return "server asked for max_completion_tokens instead of max_tokens"
        return None

    def _pause(
        self, ask: Ask[Any], response: httpx.Response, error: ServerError, count: int
    ) -> None:
        if count > MAX_RATE_LIMIT_WAITS:
            msg = (
                f"model server {self.base_url} rate-limited {MAX_RATE_LIMIT_WAITS} "
                f"requests in a row for role {ask.role} ({error.describe()}); run "
                "fewer workers or raise the account's rate limit"
            )
            raise BrainServerError(msg)
        requested = retry_after(response)
        fallback = 2.0**count
        wait = min(
            requested if requested is not None else fallback, self.max_retry_after
        )
        self._quirks.paused_until = max(
            self._quirks.paused_until, time.monotonic() + wait
        )
        logger.warning(
            "model server rate-limited the request, waiting server=%s role=%s "
            "task=%s wait=%.1fs retry_after=%s attempt=%d",
            self.base_url,
            ask.role,
            ask.task_id,
            wait,
            "none" if requested is None else f"{requested:g}s",
            count,
        )

    async def _wait_for_pause(self) -> None:
        delay = self._quirks.paused_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def _sent_tokens(text: str) -> int:
    """Estimate the tokens of ``text`` as it travels inside the JSON request body."""
    return estimate_tokens(json.dumps(text))
