"""A private redis-server for fault-injection tests, started and stopped by the test.

Tests that restart, flush, kill or reconfigure Redis run it on their own port
(6390-6394), never against the shared server on 6379. The server keeps its
files in a temporary directory, so a restart with persistence on finds the
dump written by ``SHUTDOWN SAVE``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS_SERVER = "/usr/bin/redis-server"
PRIVATE_PORTS = range(6390, 6395)
START_TIMEOUT = 10.0  # seconds a starting server has to answer PING
STOP_TIMEOUT = 5.0  # seconds a stopping server has before it is killed


def port_is_open(port: int) -> bool:
    """Tell whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RedisServer:
    """One redis-server process on 127.0.0.1, restartable on the same port."""

    def __init__(self, port: int, *options: str) -> None:
        if port not in PRIVATE_PORTS:
            msg = f"port {port} is not a private test port; use one of 6390-6394"
            raise ValueError(msg)
        self.port = port
        self.options = options
        self.directory = Path(tempfile.mkdtemp(prefix=f"hivebus-redis-{port}-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.directory / "redis.log"

    @property
    def url(self) -> str:
        """The ``redis://`` URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """Return a new synchronous client on the server."""
        # No retries: a test that stops the server wants the error at once.
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 0),
        )

    def start(self) -> None:
        """Start the server and wait until it answers PING with its data loaded."""
        if self.process is not None and self.process.poll() is None:
            msg = f"redis-server on port {self.port} is already running"
            raise RuntimeError(msg)
        if port_is_open(self.port):
            msg = (
                f"port {self.port} is taken, probably by a redis-server left from an "
                "earlier run; stop that process and run the test again"
            )
            raise RuntimeError(msg)
        command = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log),
            "--daemonize",
            "no",
            *self.options,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        client = self.client()
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    msg = f"redis-server exited at start; see {self.log}"
                    raise RuntimeError(msg)
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() >= deadline:
                    msg = f"redis-server on port {self.port} not ready in time"
                    raise RuntimeError(msg)
                time.sleep(0.05)
        finally:
            client.close()

    def shutdown(self, *, save: bool) -> None:
        """Stop the server with ``SHUTDOWN SAVE`` or ``SHUTDOWN NOSAVE``."""
        client = self.client()
        try:
            client.shutdown(save=save, nosave=not save)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        self.wait_stopped()

    def wait_stopped(self) -> None:
        """Wait for the process to exit; kill it if it takes too long."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """Kill the server if it still runs; safe to call more than once."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.wait_stopped()

    def remove(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextmanager
def private_redis(port: int, *options: str) -> Iterator[RedisServer]:
    """Run a private redis-server for the block; it is always killed at the end."""
    server = RedisServer(port, *options)
    try:
        server.start()
        yield server
    finally:
        server.remove()
