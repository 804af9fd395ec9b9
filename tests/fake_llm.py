"""A fake OpenAI-compatible chat-completions server for tests, on 127.0.0.1.

The server runs in a thread on a free port and logs every request (arrival
time, headers, body). It identifies the role by the opening of the system
message ("You are the developer ...", as in the default role prompts) and
responds from that role's script of replies, in order. The last reply of a
script repeats. A handler set with ``on_request`` gets every request first
and may return a response instead (``None`` falls through to the script).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROLE_OPENING = re.compile(
    r"You are the "
    r"(master|project manager|developer|UX designer|tester|prompt analyst)\b"
)
ROLE_NAMES = {
    "master": "master",
    "project manager": "pm",
    "developer": "developer",
    "UX designer": "ux",
    "tester": "tester",
    "prompt analyst": "analyst",
}
DEFAULT_USAGE = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}


@dataclass
class Reply:
    """One scripted response: a completion (status 200) or an error body."""

    status: int = 200
    content: str = ""
    finish_reason: str = "stop"
    usage: dict[str, int] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))
    body: Any = None  # an error body, sent as JSON instead of a completion
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds the server waits before it responds

    @classmethod
    def of(cls, value: Any, **options: Any) -> Reply:
        """Return a completion whose content is ``value`` as JSON."""
        return cls(content=json.dumps(value), **options)

    @classmethod
    def error(
        cls, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> Reply:
        """Return an error response with a JSON body."""
        return cls(status=status, body=body, headers=headers or {})


@dataclass
class Request:
    """One request the fake received."""

    arrived: float  # time.monotonic() at arrival
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    role: str | None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    @property
    def system(self) -> str:
        first = self.messages[0] if self.messages else {}
        return str(first.get("content", "")) if first.get("role") == "system" else ""

    @property
    def last_user(self) -> str:
        users = [m for m in self.messages if m.get("role") == "user"]
        return str(users[-1]["content"]) if users else ""


Handler = Callable[[Request], Reply | None]


class FakeLLM:
    """The fake server; ``start`` it, read ``url`` and ``requests``, then ``stop``."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.on_request: Handler | None = None
        self._scripts: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # A unique path per server, so that state a client keeps per base URL
        # never carries over to another test's server on a reused port.
        self._root = f"/fake-{secrets.token_hex(4)}/v1"

    @property
    def url(self) -> str:
        assert self._server is not None, "start the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self._root}"

    def script(self, role: str, *replies: Reply) -> None:
        """Answer ``role``'s requests with ``replies`` in order; the last repeats."""
        with self._lock:
            self._scripts[role] = list(replies)

    def for_role(self, role: str) -> list[Request]:
        """Return the requests that came from ``role``, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.role == role]

    def start(self) -> FakeLLM:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- called from the server's threads --------------------------------

    def _answer(self, path: str, headers: dict[str, str], raw: bytes) -> Reply:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return Reply.error(400, {"error": {"message": "body is not JSON"}})
        request = Request(time.monotonic(), path, headers, body, None)
        request.role = _role_of(request.system)
        with self._lock:
            self.requests.append(request)
        if not path.startswith(self._root) or not path.endswith("/chat/completions"):
            return Reply.error(404, {"error": {"message": f"no route {path}"}})
        if self.on_request is not None:
            response = self.on_request(request)
            if response is not None:
                return response
        with self._lock:
            script = self._scripts.get(request.role or "")
            if not script:
                message = f"fake: nothing scripted for role {request.role!r}"
                return Reply.error(500, {"error": {"message": message}})
            return script.pop(0) if len(script) > 1 else script[0]

    def _wait(self, seconds: float) -> None:
        self._stopping.wait(seconds)


def _role_of(system: str) -> str | None:
    match = ROLE_OPENING.search(system)
    return ROLE_NAMES[match.group(1)] if match else None


def _completion(reply: Reply, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"chatcmpl-{secrets.token_hex(6)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "finish_reason": reply.finish_reason,
            }
        ],
    }
    if reply.usage is not None:
        body["usage"] = reply.usage
    return body


def _handler_class(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class ChatHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            headers = {name.lower(): value for name, value in self.headers.items()}
            reply = fake._answer(self.path, headers, raw)
            if reply.delay:
                fake._wait(reply.delay)
            if reply.status == 200 and reply.body is None:
                model = str(json.loads(raw or b"{}").get("model", ""))
                payload = json.dumps(_completion(reply, model)).encode()
            else:
                payload = json.dumps(reply.body).encode()
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a timeout test)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean; the fake logs to ``requests``

    return ChatHandler
