"""Versioned system prompts per role, kept in Redis and shared by every process.

Each role's prompt is a numbered series of versions, and version 1 is the
built-in default. Every later version is proposed by the analyser or by a
rollback. It carries a reason, the ids of the events that triggered it and
a unified diff to the version before. The current version is the latest one,
unless an operator pinned another. Reads always go to Redis, so a change made
by one process is used by the next call in every other process.

A prompt is at most ``MAX_PROMPT_CHARS`` characters (about 1,500 tokens, a
fifth of the default 8,192-token context window), so learned guidelines
cannot crowd the task out of the model's context.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict
from redis.exceptions import WatchError

from hivebus.connection import Redis
from hivebus.errors import PromptError, PromptNotFoundError
from hivebus.keys import Keys
from hivebus.team.work import ROLES, Role

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 6000
MAX_REASON_CHARS = 1000
MAX_TRIGGERS = 50
MAX_PROPOSE_ATTEMPTS = 50  # optimistic transactions before giving up under contention

DEFAULT_PROMPTS: dict[Role, str] = {
    "master": (
        "You are the master of a software team with a project manager, a "
        "developer, a UX designer and a tester. Break the task you are given "
        "into a plan: a one-paragraph summary and 1 to 20 steps, each with a "
        "short title and a concrete goal, in the order the work should happen. "
        "Do not add requirements that the task does not state. If the input has "
        "a feedback section, revise the plan to address it."
    ),
    "pm": (
        "You are the project manager of a software team. Turn the plan you are "
        "given into user stories keyed S1, S2, ... in plan order. Give each "
        "story a title, a description and testable acceptance criteria, one "
        "behaviour per criterion. Set needs_design to true for stories that add "
        "or change a page, screen or other user interface. Keep each story small "
        "enough for one developer to finish in one change."
    ),
    "developer": (
        "You are the developer of a software team. Implement the story you are "
        "given. Reply with a summary of the change, the files you add or change, "
        "and in covered_criteria the acceptance criteria that your change "
        "satisfies, copied word for word from the story. If the input has a "
        "findings section, fix every finding in it."
    ),
    "ux": (
        "You are the UX designer of a software team. Design the user interface "
        "for the story you are given: a summary of the layout and behaviour, and "
        "the screens or states to build. Follow the product's existing patterns, "
        "keep every control reachable by keyboard and write labels in plain words."
    ),
    "tester": (
        "You are the tester of a software team. Check the implementation you are "
        "given against every acceptance criterion of its story. Set passed to "
        "true only if every criterion is met. For each criterion that is not "
        "met, add a finding that quotes the criterion word for word and says "
        "what is missing."
    ),
}


class PromptVersion(BaseModel):
    """One stored version of a role's system prompt."""

    model_config = ConfigDict(frozen=True)

    role: Role
    version: int
    text: str
    reason: str
    triggers: tuple[str, ...] = ()
    diff: str = ""
    created_ms: int


class PromptStore:
    """The versioned role prompts of one namespace; every read goes to Redis."""

    def __init__(self, client: Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys

    async def ensure_defaults(self) -> None:
        """Store version 1 of every role that has none; safe to run in any process."""
        for role in ROLES:
            await self._ensure(role)

    async def current(self, role: str) -> PromptVersion:
        """Return the version in use: the pinned one, or else the latest.

        A role without versions gets its default version 1 first.
        """
        role = check_role(role)
        latest, pin = await self._meta(role)
        if latest is None:
            await self._ensure(role)
            latest, pin = await self._meta(role)
        return await self.get(role, pin or latest or 1)

    async def get(self, role: str, version: int) -> PromptVersion:
        """Return one version of a role's prompt, or raise ``PromptNotFoundError``."""
        role = check_role(role)
        raw = await self._client.get(self._keys.prompt_version(role, version))
        if raw is None and version == 1:
            await self._ensure(role)
            raw = await self._client.get(self._keys.prompt_version(role, version))
        if raw is None:
            latest, _ = await self._meta(role)
            msg = (
                f"prompt {role!r} has no version {version!r}; versions run from 1 to "
                f"{latest or 0} (see `hivebus prompts history {role}`)"
            )
            raise PromptNotFoundError(msg)
        return PromptVersion.model_validate_json(raw)

    async def history(
        self, role: str, *, limit: int | None = None
    ) -> list[PromptVersion]:
        """Return a role's versions, oldest first; ``limit`` keeps the newest ones."""
        role = check_role(role)
        latest, _ = await self._meta(role)
        if latest is None:
            await self._ensure(role)
            latest = 1
        first = 1 if limit is None else max(1, latest - limit + 1)
        names = [self._keys.prompt_version(role, n) for n in range(first, latest + 1)]
        raws = await self._client.mget(names)
        return [PromptVersion.model_validate_json(raw) for raw in raws if raw]

    async def latest_version(self, role: str) -> int:
        """Return the number of a role's newest version."""
        role = check_role(role)
        latest, _ = await self._meta(role)
        if latest is None:
            await self._ensure(role)
        return latest or 1

    async def pinned(self, role: str) -> int | None:
        """Return the version a role is pinned to, or ``None``."""
        _, pin = await self._meta(check_role(role))
        return pin

    async def propose(
        self, role: str, text: str, *, reason: str, triggers: Sequence[str] = ()
    ) -> PromptVersion:
        """Store ``text`` as a role's next version and return it.

        Two processes that propose at once get distinct version numbers, each
        with a diff to the version before it. Text equal to the latest
        version's is not stored again; that version is returned.
        """
        role = check_role(role)
        _check_text(role, text)
        reason = _check_reason(reason)
        trigger_ids = _check_triggers(triggers)
        await self._ensure(role)
        created = await self._append(role, text, reason, trigger_ids, unpin=False)
        assert created is not None  # only a base version can make it None
        return created

    async def propose_if_latest(
        self,
        role: str,
        base_version: int,
        text: str,
        *,
        reason: str,
        triggers: Sequence[str] = (),
    ) -> PromptVersion | None:
        """Store ``text`` as the next version only while ``base_version`` is latest.

        Returns ``None``, storing nothing, when another process stored a
        newer version since ``base_version`` was read: re-read the latest
        text and derive the change from it again.
        """
        role = check_role(role)
        _check_text(role, text)
        reason = _check_reason(reason)
        trigger_ids = _check_triggers(triggers)
        await self._ensure(role)
        return await self._append(
            role, text, reason, trigger_ids, unpin=False, base=base_version
        )

    async def pin(self, role: str, version: int) -> PromptVersion:
        """Make ``version`` the one in use until ``unpin``, and return it."""
        chosen = await self.get(role, version)
        await self._client.hset(self._keys.prompt(chosen.role), "pin", version)
        logger.info("prompt pinned role=%s version=%d", chosen.role, version)
        return chosen

    async def unpin(self, role: str) -> None:
        """Use the latest version again."""
        role = check_role(role)
        await self._client.hdel(self._keys.prompt(role), "pin")
        logger.info("prompt unpinned role=%s", role)

    async def rollback(self, role: str, version: int) -> PromptVersion:
        """Store ``version``'s text as a new version, clear any pin, and return it."""
        old = await self.get(role, version)
        reason = f"rollback to version {version}"
        created = await self._append(old.role, old.text, reason, (), unpin=True)
        assert created is not None  # only a base version can make it None
        logger.info(
            "prompt rolled back role=%s to=%d new_version=%d",
            old.role,
            version,
            created.version,
        )
        return created

    # -- storage ---------------------------------------------------------

    async def _meta(self, role: Role) -> tuple[int | None, int | None]:
        latest, pin = await self._client.hmget(self._keys.prompt(role), "latest", "pin")
        return _int(latest), _int(pin)

    async def _ensure(self, role: Role) -> None:
        first = PromptVersion(
            role=role,
            version=1,
            text=DEFAULT_PROMPTS[role],
            reason="built-in default",
            created_ms=_now_ms(),
        )
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(
                self._keys.prompt_version(role, 1), first.model_dump_json(), nx=True
            )
            pipe.hsetnx(self._keys.prompt(role), "latest", 1)
            await pipe.execute()

    async def _append(
        self,
        role: Role,
        text: str,
        reason: str,
        triggers: tuple[str, ...],
        *,
        unpin: bool,
        base: int | None = None,
    ) -> PromptVersion | None:
        meta = self._keys.prompt(role)
        for attempt in range(1, MAX_PROPOSE_ATTEMPTS + 1):
            async with self._client.pipeline(transaction=True) as pipe:
                try:
                    return await self._try_append(
                        pipe, meta, role, text, reason, triggers, unpin=unpin, base=base
                    )
                except WatchError:
                    pass
            # Another process appended first: back off a little, then rebase.
            await asyncio.sleep(random.uniform(0, 0.002 * attempt))
        msg = (
            f"could not store a new {role!r} prompt version: {MAX_PROPOSE_ATTEMPTS} "
            "concurrent changes won the race; try again"
        )
        raise PromptError(msg)

    async def _try_append(
        self,
        pipe: Any,
        meta: str,
        role: Role,
        text: str,
        reason: str,
        triggers: tuple[str, ...],
        *,
        unpin: bool,
        base: int | None,
    ) -> PromptVersion | None:
        await pipe.watch(meta)
        latest = _int(await pipe.hget(meta, "latest")) or 1
        if base is not None and latest != base:
            await pipe.unwatch()
            return None

        raw = await pipe.get(self._keys.prompt_version(role, latest))
        previous = PromptVersion.model_validate_json(raw) if raw else None
        if previous is not None and previous.text == text and not unpin:
            await pipe.unwatch()
            return previous

        created = PromptVersion(
            role=role,
            version=latest + 1,
            text=text,
            reason=reason,
            triggers=triggers,
            diff=_diff(role, previous, text, latest + 1),
            created_ms=_now_ms(),
        )
        pipe.multi()
        pipe.set(
            self._keys.prompt_version(role, created.version), created.model_dump_json()
        )
        pipe.hset(meta, "latest", created.version)
        if unpin:
            pipe.hdel(meta, "pin")
        await pipe.execute()

        logger.info(
            "prompt version stored role=%s version=%d reason=%r triggers=%s",
            role,
            created.version,
            reason,
            ",".join(triggers) or "-",
        )
        return created


def check_role(role: str) -> Role:
    """Return ``role`` as a ``Role``, or raise ``PromptError`` naming the valid ones."""
    if role not in get_args(Role):
        msg = f"unknown role {role!r}; use one of: {', '.join(ROLES)}"
        raise PromptError(msg)
    return role  # type: ignore[return-value]


def _check_text(role: str, text: str) -> None:
    if not text.strip():
        msg = f"the new {role!r} prompt is empty; give the full prompt text"
        raise PromptError(msg)
    if len(text) > MAX_PROMPT_CHARS:
        msg = (
            f"the new {role!r} prompt has {len(text)} characters, over the cap of "
            f"{MAX_PROMPT_CHARS}; drop older guidelines before adding new ones"
        )
        raise PromptError(msg)


def _check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        msg = "a prompt change needs a reason; say what it fixes"
        raise PromptError(msg)
    return reason[:MAX_REASON_CHARS]


def _check_triggers(triggers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(triggers, str):
        msg = f"`triggers` must be a list of event ids, got the string {triggers!r}"
        raise PromptError(msg)
    return tuple(str(trigger)[:200] for trigger in triggers)[:MAX_TRIGGERS]


def _diff(role: Role, previous: PromptVersion | None, text: str, version: int) -> str:
    if previous is None:
        return ""
    lines = difflib.unified_diff(
        previous.text.splitlines(keepends=True),
        text.splitlines(keepends=True),
        fromfile=f"{role} v{previous.version}",
        tofile=f"{role} v{version}",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _now_ms() -> int:
    return int(time.time() * 1000)
