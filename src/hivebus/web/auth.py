"""Access control of the dashboard and HTTP API.

Without a token every request is served, so the server binds 127.0.0.1 by
default. With a token, every request must carry it, except the login page
and the static files: as ``Authorization: Bearer TOKEN`` (API clients), or
as the session cookie that the login form sets (browsers). The cookie contains
an HMAC of the token, not the token itself. Tokens are compared in constant
time.

Two more checks apply with or without a token:

- The ``Host`` header must name an allowed host. A server on a loopback
  address allows only loopback names, so a web page that points its own
  domain at 127.0.0.1 (DNS rebinding) cannot read the API.
- A state-changing request (POST, PUT, PATCH, DELETE) that carries an
  ``Origin`` header must come from the server's own origin, so another
  site open in the same browser cannot submit, replay or purge.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable
from urllib.parse import quote, urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

COOKIE_NAME = "hivebus_session"
COOKIE_MAX_AGE = 7 * 24 * 3600  # seconds a login lasts in the browser
PUBLIC_PREFIXES = ("/static/", "/login")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MIN_TOKEN_LENGTH = 16


def session_value(token: str) -> str:
    """Return the cookie value that proves a login with ``token``."""
    return hmac.new(
        token.encode(), b"hivebus dashboard session", hashlib.sha256
    ).hexdigest()


def check_token(token: str) -> str:
    """Return ``token``, logging a warning when it is too short to be safe."""
    if len(token) < MIN_TOKEN_LENGTH:
        logger.warning(
            "dashboard token is short length=%d minimum=%d; generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`",
            len(token),
            MIN_TOKEN_LENGTH,
        )
    return token


def safe_next(target: str | None) -> str:
    """Return ``target`` if it is a path on this server, else ``/``."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    if urlsplit(target).netloc or "\\" in target:
        return "/"
    return target


class Guard:
    """ASGI middleware that applies the host, origin and token checks."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        allowed_hosts: Iterable[str] | None,
    ) -> None:
        self.app = app
        self._session = session_value(token) if token else None
        self._bearer = f"Bearer {token}" if token else None
        hosts = None if allowed_hosts is None else frozenset(allowed_hosts)
        self._hosts = None if hosts is None or "*" in hosts else hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> Response | None:
        headers = request.headers
        host = _hostname(headers.get("host", ""))
        if self._hosts is not None and host not in self._hosts:
            return _error(400, f"host {host!r} is not allowed for this server")
        if request.method not in SAFE_METHODS and not _same_origin(headers):
            origin = headers.get("origin")
            return _error(403, f"cross-origin request from {origin!r} rejected")
        path = request.url.path
        if self._session is None or path.startswith(PUBLIC_PREFIXES):
            return None
        if self.authorized(request):
            return None
        return self._challenge(request)

    def authorized(self, request: Request) -> bool:
        """Tell whether ``request`` carries the token or a valid session cookie."""
        assert self._session is not None
        assert self._bearer is not None
        header = request.headers.get("authorization", "")
        if header and hmac.compare_digest(header.encode(), self._bearer.encode()):
            return True
        cookie = request.cookies.get(COOKIE_NAME, "")
        return bool(cookie) and hmac.compare_digest(
            cookie.encode(), self._session.encode()
        )

    def _challenge(self, request: Request) -> Response:
        wants_page = request.method == "GET" and "text/html" in request.headers.get(
            "accept", ""
        )
        if wants_page and not request.url.path.startswith("/api/"):
            target = quote(request.url.path + _query(request), safe="/?=&")
            return RedirectResponse(f"/login?next={target}", status_code=303)
        message = (
            "missing or invalid token: send `Authorization: Bearer TOKEN`, or log "
            "in at /login"
        )
        return _error(401, message, {"WWW-Authenticate": 'Bearer realm="hivebus"'})


def new_token() -> str:
    """Return a random token suitable for ``--token``."""
    return secrets.token_urlsafe(24)


def _query(request: Request) -> str:
    query = request.url.query
    return f"?{query}" if query else ""


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _same_origin(headers: Headers) -> bool:
    origin = headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == headers.get("host", "")


def _error(
    status: int, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)
