"""Scripted brains for team tests, and a worker process that runs one role with them.

Run a role in its own process with ``python -m tests.team_harness --role ROLE
--redis URL --prefix P [--log FILE] [--slow JSON] [--failing-tester]``. The
brain wraps the offline brain and appends one JSON line per request to
``--log`` before replying, so a test counts the requests a model would have
received, including those of a process it killed mid-call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from hivebus import Bus
from hivebus.errors import BrainReplyError
from hivebus.team.brain import Ask, ModelT, Thought, Usage, prompt_sections
from hivebus.team.offline import OfflineBrain
from hivebus.team.runner import Team
from hivebus.team.work import Finding, TestReport


class ScriptedBrain:
    """The offline brain, with a request log and optional scripted behaviour.

    Args:
        log: file that gets one JSON line per request, written before the reply.
        slow: ``{"developer:S2": 5.0}`` delays those requests by that many seconds.
        failing_tester: the tester fails every story, with a new finding each round.
        broken_roles: roles whose requests raise ``BrainReplyError``.
        usage: fixed usage per call instead of the offline estimate.
    """

    name = "scripted"

    def __init__(
        self,
        log: Path | None = None,
        *,
        slow: dict[str, float] | None = None,
        failing_tester: bool = False,
        broken_roles: tuple[str, ...] = (),
        usage: Usage | None = None,
    ) -> None:
        self.inner = OfflineBrain()
        self.log = log
        self.slow = slow or {}
        self.failing_tester = failing_tester
        self.broken_roles = broken_roles
        self.usage = usage
        self.asks: list[Ask[Any]] = []
        self._rounds: dict[str, int] = {}

    async def think(self, ask: Ask[ModelT]) -> Thought[ModelT]:
        """Log the request, wait if scripted to, then reply like the offline brain."""
        self.asks.append(ask)
        self._write(ask)
        delay = self.slow.get(f"{ask.role}:{ask.story_key}", 0.0)
        if delay:
            await asyncio.sleep(delay)
        if ask.role in self.broken_roles:
            msg = f"scripted failure for role {ask.role}"
            raise BrainReplyError(msg)
        thought = await self.inner.think(ask)
        if self.failing_tester and isinstance(thought.value, TestReport):
            thought = self._fail(ask, thought)
        if self.usage is not None:
            thought = Thought(value=thought.value, usage=self.usage, calls=1)
        return thought

    def _fail(self, ask: Ask[Any], thought: Thought[Any]) -> Thought[Any]:
        key = f"{ask.task_id}:{ask.story_key}"
        self._rounds[key] = self._rounds.get(key, 0) + 1
        finding = Finding(
            criterion=f"new problem {self._rounds[key]} of {ask.story_key}",
            detail=f"finding number {self._rounds[key]}",
        )
        report = TestReport(
            story_key=ask.story_key or "S1", passed=False, findings=[finding]
        )
        return Thought(value=report, usage=thought.usage, calls=1)  # type: ignore[arg-type]

    def _write(self, ask: Ask[Any]) -> None:
        if self.log is None:
            return
        line = {
            "role": ask.role,
            "task_id": ask.task_id,
            "story": ask.story_key,
            "prompt_version": ask.prompt_version,
            "system": ask.system,
            "sections": prompt_sections(ask.prompt),
        }
        with self.log.open("a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\n")

    async def aclose(self) -> None:
        """Release nothing."""


class Workers:
    """Team worker processes for one test: started, killed and stopped by it.

    Every process writes its output to a file in ``directory``; ``stop``
    sends SIGTERM to those still running and SIGKILL to any that outlive
    ``STOP_TIMEOUT``.
    """

    STOP_TIMEOUT = 15.0

    def __init__(self, redis_url: str, prefix: str, directory: Path) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.directory = directory
        self.processes: list[subprocess.Popen[bytes]] = []

    def cli(self, role: str, *, claim: float = 2.0) -> subprocess.Popen[bytes]:
        """Start ``hivebus worker --role ROLE`` with the offline brain."""
        command = [
            *("-m", "hivebus.cli", "worker", "--role", role),
            *("--redis", self.redis_url, "--prefix", self.prefix),
            *("--claim-timeout", str(claim)),
        ]
        return self._spawn(command, f"cli-{role}")

    def scripted(
        self,
        role: str,
        name: str,
        *,
        claim: float = 2.0,
        slow: dict[str, float] | None = None,
        failing_tester: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start a worker with a ``ScriptedBrain`` that logs to ``NAME.log``."""
        command = [
            *("-m", "tests.team_harness", "--role", role),
            *("--redis", self.redis_url, "--prefix", self.prefix),
            *("--claim", str(claim), "--log", str(self.log(name))),
        ]
        if slow:
            command += ["--slow", json.dumps(slow)]
        if failing_tester:
            command.append("--failing-tester")
        return self._spawn(command, name)

    def log(self, name: str) -> Path:
        """Return the request log of the scripted worker ``name``."""
        return self.directory / f"{name}.log"

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen[bytes]:
        output = (self.directory / f"{name}.out").open("ab")
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(root)}
        process = subprocess.Popen(
            [sys.executable, *command],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=env,
        )
        output.close()
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop every process this helper started."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def read_log(path: Path) -> list[dict[str, Any]]:
    """Return the requests a ``ScriptedBrain`` logged to ``path``."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def serve(options: argparse.Namespace) -> None:
    """Run one role until SIGTERM."""
    slow = json.loads(options.slow) if options.slow else {}
    brain = ScriptedBrain(
        Path(options.log) if options.log else None,
        slow=slow,
        failing_tester=options.failing_tester,
    )
    bus = Bus(options.redis, prefix=options.prefix, service=f"team.{options.role}")
    team = Team(bus, roles=[options.role], brain=brain, claim_timeout=options.claim)
    current = asyncio.current_task()
    assert current is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
    try:
        await team.run_forever()
    except asyncio.CancelledError:
        pass


def main(argv: list[str]) -> None:
    """Parse the options and serve."""
    parser = argparse.ArgumentParser(prog="team_harness")
    parser.add_argument("--role", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--claim", type=float, default=2.0)
    parser.add_argument("--log", default="")
    parser.add_argument("--slow", default="")
    parser.add_argument("--failing-tester", action="store_true")
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
