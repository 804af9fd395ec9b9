"""Circuit breakers whose state lives in Redis, shared by every instance.

A breaker is closed until failures reach a count (or a rate) within a window;
then it opens and rejects calls for a cool-down. After the cool-down, exactly
one caller across all instances gets a probe lease (half-open); the probe's
success closes the breaker and its failure opens it again.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from hivebus.connection import Redis
from hivebus.errors import BreakerOpenError
from hivebus.keys import Keys, check_name
from hivebus.scripts import Scripts

logger = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["closed", "open", "half_open"]
Verdict = Literal["allow", "probe", "reject"]


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker opens and how long it stays open.

    Args:
        failure_threshold: failures within ``window`` that open the breaker.
        window: seconds over which failures are counted.
        cooldown: seconds the breaker stays open before one probe may pass.
        failure_rate: if above 0, the breaker also opens when this share of
            calls failed, once ``min_calls`` calls were made in the window.
        probe_timeout: seconds the probe lease lasts, so that a probe whose
            process died does not block the breaker for good.
    """

    failure_threshold: int = 5
    window: float = 60.0
    cooldown: float = 30.0
    failure_rate: float = 0.0
    min_calls: int = 10
    probe_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            threshold = self.failure_threshold
            msg = f"`failure_threshold` must be at least 1, got {threshold!r}"
            raise ValueError(msg)
        if not 0.0 <= self.failure_rate <= 1.0:
            msg = f"`failure_rate` must be between 0 and 1, got {self.failure_rate!r}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Permit:
    """Permission for one call: whether it passes, and whether it is the probe."""

    verdict: Verdict
    state: State
    retry_after: float
    token: str = ""

    @property
    def allowed(self) -> bool:
        """Whether the call may go ahead."""
        return self.verdict != "reject"


StateListener = Callable[[str, State, State], Awaitable[None]]


class CircuitBreaker:
    """A named breaker; ``call`` wraps any coroutine function with it."""

    def __init__(
        self,
        name: str,
        client: Redis,
        keys: Keys,
        scripts: Scripts,
        config: BreakerConfig | None = None,
        on_change: StateListener | None = None,
    ) -> None:
        self.name = check_name("breaker", name)
        self.config = config or BreakerConfig()
        self._client = client
        self._hash = keys.breaker(name)
        self._probe = keys.breaker_probe(name)
        self._scripts = scripts
        self._on_change = on_change

    async def acquire(self) -> Permit:
        """Ask whether a call may pass now; a probe permit must be recorded."""
        token = secrets.token_hex(8)
        reply = await self._scripts.breaker_allow(
            keys=[self._hash, self._probe],
            args=[
                int(self.config.cooldown * 1000),
                int(self.config.probe_timeout * 1000),
                token,
            ],
        )
        verdict, state, wait_ms = _text(reply[0]), _text(reply[1]), int(reply[2])
        if verdict == "probe":
            logger.info(
                "circuit breaker half-open, probe let through breaker=%s", self.name
            )
        return Permit(
            verdict=verdict,  # type: ignore[arg-type]
            state=state,  # type: ignore[arg-type]
            retry_after=wait_ms / 1000,
            token=token if verdict == "probe" else "",
        )

    async def record(self, permit: Permit, *, success: bool) -> State:
        """Record a call's outcome and return the breaker's state after it."""
        reply = await self._scripts.breaker_record(
            keys=[self._hash, self._probe],
            args=[
                "success" if success else "failure",
                self.config.failure_threshold,
                int(self.config.window * 1000),
                permit.token,
                self.config.min_calls,
                self.config.failure_rate,
            ],
        )
        before, after = _text(reply[0]), _text(reply[1])
        if before != after:
            await self._changed(before, after)  # type: ignore[arg-type]
        return after  # type: ignore[return-value]

    async def _changed(self, before: State, after: State) -> None:
        if after == "open":
            logger.warning(
                "circuit breaker opened breaker=%s was=%s cooldown=%.1fs",
                self.name,
                before,
                self.config.cooldown,
            )
        else:
            logger.info(
                "circuit breaker %s breaker=%s was=%s", after, self.name, before
            )
        if self._on_change is not None:
            await self._on_change(self.name, before, after)

    async def state(self) -> dict[str, Any]:
        """Return the shared state: ``state``, ``failures``, ``opened_at`` (ms)."""
        raw = await self._client.hgetall(self._hash)
        values = {_text(k): _text(v) for k, v in raw.items()}
        return {
            "name": self.name,
            "state": values.get("state", "closed"),
            "failures": int(values.get("failures", "0")),
            "calls": int(values.get("calls", "0")),
            "opened_at_ms": int(values.get("opened_at", "0")),
        }

    async def reset(self) -> None:
        """Close the breaker and forget its failures."""
        await self._client.delete(self._hash, self._probe)
        logger.info("circuit breaker reset breaker=%s", self.name)

    async def call(self, function: Callable[[], Awaitable[T]]) -> T:
        """Run ``function`` through the breaker, or raise if the breaker rejects it."""
        permit = await self.acquire()
        if not permit.allowed:
            raise BreakerOpenError(self.name, permit.retry_after)
        try:
            result = await function()
        except Exception:
            await self.record(permit, success=False)
            raise
        await self.record(permit, success=True)
        return result


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
