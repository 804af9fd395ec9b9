"""Start, kill and supervise durable worker processes from a test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WORKER_SCRIPT = Path(__file__).with_name("durable_worker.py")
STOP_TIMEOUT = 10.0  # seconds a worker has to exit after SIGTERM before SIGKILL
POLL = 0.05  # seconds between a supervisor's checks of its worker


class Worker:
    """One durable worker process, configured by ``HB_*`` variables.

    ``options`` maps lowercase names to values: url, prefix, channel, group,
    consumer, concurrency, batch, claim_timeout, max_attempts, backoff_base,
    backoff_cap, sleep, drain, and the hooks poison_exit, fail_first,
    effect and exit_after_effect (1 to turn on).
    """

    def __init__(self, log: Path, **options: Any) -> None:
        self.options = options
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start the process (again, if it has exited)."""
        env = dict(os.environ)
        env.update({f"HB_{k.upper()}": str(v) for k, v in self.options.items()})
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER_SCRIPT)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """Ask the process to stop (SIGTERM); SIGKILL it if it does not exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()


class Supervisor:
    """Restart a worker within ``POLL`` seconds whenever it exits."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the worker and begin watching it."""
        self.worker.start()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            if not self.worker.alive:
                self.restarts += 1
                self.worker.start()

    async def stop(self) -> None:
        """Stop watching, then stop the worker."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.worker.stop()


@contextlib.contextmanager
def reaped(workers: list[Worker]) -> Iterator[list[Worker]]:
    """Yield ``workers`` and SIGKILL any still running on the way out."""
    try:
        yield workers
    finally:
        for worker in workers:
            worker.kill()
