"""``Team``: the roles of the team on one bus, all in one process or one per process.

Every role reads its channels through durable subscriptions in a consumer
group named after the role, so any number of processes can run the same
role and share its work. When one dies, the claim timeout hands its
in-flight entries to a live instance of the same role::

    bus = Bus("redis://127.0.0.1:6379/0", service="team")
    async with Team(bus) as team:             # every role in this process
        task_id = await team.client.submit("Add CSV export to the orders page")
        async for update in team.client.follow(task_id):
            print(update.percent, update.message)

    Team(bus, roles=["developer"])            # one role, as `hivebus worker` runs it
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, Self

from hivebus.bus import DEAD_LETTERED_TYPE, ERRORS_CHANNEL, Bus
from hivebus.errors import ConfigError
from hivebus.retry import RetryPolicy
from hivebus.team.agents import ProjectManager, Worker
from hivebus.team.analyser import Analyser
from hivebus.team.brain import Brain
from hivebus.team.client import TaskClient
from hivebus.team.config import TeamSettings, make_brain
from hivebus.team.master import Master
from hivebus.team.member import Crew
from hivebus.team.models import (
    CONTROL_CHANNEL,
    PLANNING_CHANNEL,
    RESULTS_CHANNEL,
    STATUS_CHANNEL,
    STORIES_CHANNEL,
    TASKS_CHANNEL,
    register_types,
    work_channel,
)
from hivebus.team.progress import ProgressLog
from hivebus.team.project import ProjectContexts
from hivebus.team.prompts import PromptStore
from hivebus.team.state import TaskStore
from hivebus.team.work import ROLES, Role

logger = logging.getLogger(__name__)

APPROVAL_SWEEP_INTERVAL = 1.0  # seconds between checks for expired plan approvals
HANDLER_RETRY = RetryPolicy(max_attempts=5, base=0.2, cap=5.0)


class Team:
    """The master, project manager, developer, UX designer and tester on one bus.

    Args:
        roles: the roles this process runs; all of them by default.
        brain: the brain every role uses; by default the one ``settings``
            describe (the offline brain when no ``brain_url`` is set).
        claim_timeout: seconds before a live instance claims the entries a
            dead one left pending; also the lease time of a work item.
        concurrency: handler runs in flight per role and channel.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        settings: TeamSettings | None = None,
        roles: Iterable[str] = ROLES,
        brain: Brain | None = None,
        analyser: Analyser | None = None,
        claim_timeout: float = 30.0,
        concurrency: int = 8,
    ) -> None:
        self.bus = bus
        self.settings = settings or TeamSettings()
        self.roles: tuple[Role, ...] = tuple(_check_roles(roles))
        self.claim_timeout = claim_timeout
        self.concurrency = concurrency
        self.client = TaskClient(bus)
        self.master: Master | None = None
        self._brain = brain
        self._analyser = analyser
        self._crew: Crew | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        register_types(bus.types)

    @property
    def projects(self) -> ProjectContexts:
        """The project-wide contexts; available once the team started."""
        if self._crew is None:
            msg = "the team is not started: use `async with team:` or `team.start()`"
            raise ConfigError(msg)
        return self._crew.projects

    async def start(self) -> None:
        """Connect, subscribe every role of this process and start consuming.

        A team starts once; build a new ``Team`` (on a new bus) to run again.
        """
        if self._crew is not None:
            msg = "this team was started before; build a new `Team` to run again"
            raise ConfigError(msg)
        await self.bus.connect()
        crew = self._crew = self._make_crew()
        await crew.prompts.ensure_defaults()
        for role in self.roles:
            self._subscribe(role, crew)
        await self.bus.start()

        if self.master is not None:
            self._sweeper = asyncio.create_task(
                self._sweep(self.master), name="hivebus-team-approvals"
            )
        logger.info(
            "team started roles=%s brain=%s claim_timeout=%.1fs",
            ",".join(self.roles),
            crew.brain.name,
            self.claim_timeout,
        )

    def _make_crew(self) -> Crew:
        brain = self._brain or make_brain(
            self.settings, breaker=self.bus.breaker("brain")
        )
        self._brain = brain
        return Crew(
            bus=self.bus,
            store=TaskStore(self.bus.client, self.bus.keys),
            progress=ProgressLog(self.bus.client, self.bus.keys),
            prompts=PromptStore(self.bus.client, self.bus.keys),
            projects=ProjectContexts(self.bus),
            brain=brain,
            lease_seconds=self.claim_timeout,
        )

    async def stop(self) -> None:
        """Stop consuming, finish in-flight work and close the brain."""
        self._stopping.set()
        if self._sweeper is not None:
            await self._sweeper
            self._sweeper = None
        await self.bus.stop()
        if self._crew is not None:
            await self._crew.projects.close()
        if self._brain is not None:
            await self._brain.aclose()
        logger.info("team stopped roles=%s", ",".join(self.roles))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run_forever(self) -> None:
        """Start, then serve until cancelled (for worker processes)."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())

    def _subscribe(self, role: Role, crew: Crew) -> None:
        options: dict[str, Any] = {
            "durable": True,
            "group": role,
            "claim_timeout": self.claim_timeout,
            "concurrency": self.concurrency,
            "retry": HANDLER_RETRY,
        }
        subscribe = self.bus.subscribe
        if role == "master":
            master = Master(
                crew,
                analyser=self._analyser,
                approval_timeout=self.settings.approval_timeout,
            )
            self.master = master
            subscribe(TASKS_CHANNEL, **options)(master.on_submitted)
            subscribe(CONTROL_CHANNEL, **options)(master.on_control)
            subscribe(STORIES_CHANNEL, **options)(master.on_story)
            subscribe(RESULTS_CHANNEL, **options)(master.on_result)
            # One status at a time keeps a role's updates in publish order;
            # the board still rejects older states from other processes.
            subscribe(STATUS_CHANNEL, **{**options, "concurrency": 1})(master.on_status)
            subscribe(ERRORS_CHANNEL, raw=True, types=[DEAD_LETTERED_TYPE], **options)(
                master.on_dead_letter
            )
        elif role == "pm":
            subscribe(PLANNING_CHANNEL, **options)(ProjectManager(crew).on_plan)
        else:
            worker = Worker(crew, role)
            subscribe(work_channel(role), **options)(worker.on_assignment)

    async def _sweep(self, master: Master) -> None:
        # Stopped by an event rather than by cancellation, so a sweep that
        # is ending a task finishes its writes before the bus stops.
        while not self._stopping.is_set():
            try:
                await master.expire_approvals()
            except Exception:
                logger.exception("approval sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopping.wait(), timeout=APPROVAL_SWEEP_INTERVAL
                )


def _check_roles(roles: Iterable[str]) -> list[Role]:
    chosen: list[Role] = []
    for role in roles:
        if role not in ROLES:
            msg = f"unknown role {role!r}; use one of: {', '.join(ROLES)}"
            raise ConfigError(msg)
        if role not in chosen:
            chosen.append(role)
    if not chosen:
        msg = f"a team needs at least one role; use one or more of: {', '.join(ROLES)}"
        raise ConfigError(msg)
    return chosen
