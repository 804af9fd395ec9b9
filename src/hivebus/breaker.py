"""Circuit breakers whose state lives in Redis, shared by every instance.

A breaker is closed until the failures within a sliding window reach a count
(or a share of the calls). Then it opens and rejects calls for a cool-down.
After the cool-down, exactly one caller across all instances gets a probe
lease and the breaker is half-open: every other call is rejected until the
probe's success closes the breaker or its failure opens it again.

Every decision runs in a Lua script on the server's clock (``TIME``), so
instances with skewed clocks agree. Each state change is logged at INFO by
the instance that caused it and passed to the ``on_change`` listener, which
the ``Bus`` turns into a ``hivebus.breaker.changed`` event on
``hivebus.breakers``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar

from hivebus.connection import Redis
from hivebus.errors import BreakerOpenError
from hivebus.keys import Keys, check_name
from hivebus.scripts import Scripts

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
State = Literal["closed", "open", "half_open"]
Verdict = Literal["allow", "probe", "reject"]

STATES: tuple[State, ...] = ("closed", "open", "half_open")
VERDICTS: tuple[Verdict, ...] = ("allow", "probe", "reject")


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker opens and how long it stays open.

    Args:
        failure_threshold: failures within ``window`` that open the breaker.
        window: seconds over which calls and failures are counted, as a
            sliding window of ``buckets`` parts.
        cooldown: seconds the breaker stays open before one probe may pass.
        failure_rate: if above 0, the breaker also opens when this share of
            calls failed, once ``min_calls`` calls were made in the window.
        min_calls: calls in the window before ``failure_rate`` applies.
        probe_timeout: seconds the probe lease lasts. A probe that has not
            reported by then (its process died, or it hangs) loses the lease
            and the next caller becomes the probe, so keep it above the
            longest call.
        excluded: exception types that do not count as failures, because the
            dependency responded (a validation error, a "not found"). They
            are recorded as successes and re-raised.
        buckets: parts of the sliding window.
    """

    failure_threshold: int = 5
    window: float = 60.0
    cooldown: float = 30.0
    failure_rate: float = 0.0
    min_calls: int = 10
    probe_timeout: float = 60.0
    excluded: tuple[type[BaseException], ...] = ()
    buckets: int = 10

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            threshold = self.failure_threshold
            msg = f"`failure_threshold` must be at least 1, got {threshold!r}"
            raise ValueError(msg)
        if not 0.0 <= self.failure_rate <= 1.0:
            msg = f"`failure_rate` must be between 0 and 1, got {self.failure_rate!r}"
            raise ValueError(msg)
        if self.window <= 0 or self.probe_timeout <= 0 or self.cooldown < 0:
            msg = (
                f"`window` ({self.window!r}) and `probe_timeout` "
                f"({self.probe_timeout!r}) must be above 0 and `cooldown` "
                f"({self.cooldown!r}) not negative"
            )
            raise ValueError(msg)
        if self.min_calls < 1 or not 1 <= self.buckets <= 100:
            msg = (
                f"`min_calls` must be at least 1 (got {self.min_calls!r}) and "
                f"`buckets` between 1 and 100 (got {self.buckets!r})"
            )
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Permit:
    """Permission for one call: whether it passes, and whether it is the probe.

    Attributes:
        verdict: ``allow`` (closed), ``probe`` (the single half-open trial)
            or ``reject``.
        state: the breaker's state after the decision.
        retry_after: seconds until a call may pass again, when rejected.
        token: the probe lease's token; empty unless ``verdict`` is probe.
    """

    verdict: Verdict
    state: State
    retry_after: float
    token: str = ""

    @property
    def allowed(self) -> bool:
        """Whether the call may go ahead."""
        return self.verdict != "reject"


@dataclass(frozen=True, slots=True)
class BreakerState:
    """A breaker's shared state as stored in Redis.

    Attributes:
        failures: failed calls in the current window (only counted while
            closed; reset when a probe closes the breaker).
        calls: calls in the current window.
        opened_at_ms: server time in ms when the breaker last opened, or 0.
        changed_at_ms: server time in ms of the last state change, or 0.
    """

    name: str
    state: State
    failures: int
    calls: int
    opened_at_ms: int
    changed_at_ms: int


StateListener = Callable[[str, State, State], Awaitable[None]]


class CircuitBreaker:
    """A named breaker shared through Redis; ``call`` wraps any coroutine function.

    Get one from ``bus.breaker(name, config)``. Every instance that uses the
    same name and prefix shares one state, so give them the same config.
    """

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

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self.name!r}, config={self.config!r})"

    async def acquire(self) -> Permit:
        """Ask whether a call may pass now; every allowed permit must be recorded."""
        token = secrets.token_hex(8)
        permit, before = await self._allow(token)
        if permit.verdict != "probe":
            return permit
        if before == "half_open":
            logger.info(
                "circuit breaker probe lease expired, new probe let through breaker=%s",
                self.name,
            )
        else:
            await self._changed(before, "half_open")
        return permit

    async def peek(self) -> Permit:
        """Tell whether a call could pass now, without taking the probe lease."""
        permit, _ = await self._allow("")
        return permit

    async def _allow(self, token: str) -> tuple[Permit, State]:
        reply = await self._scripts.breaker_allow(
            keys=[self._hash, self._probe],
            args=[
                int(self.config.cooldown * 1000),
                int(self.config.probe_timeout * 1000),
                token,
            ],
        )
        verdict = _verdict(reply[0])
        permit = Permit(
            verdict=verdict,
            state=_state(reply[1]),
            retry_after=int(reply[2]) / 1000,
            token=token if verdict == "probe" else "",
        )
        return permit, _state(reply[3])

    async def record(
        self, permit: Permit, *, success: bool, trip: bool = False
    ) -> State:
        """Record a call's outcome and return the breaker's state after it.

        With ``trip``, this failure alone opens a closed breaker, whatever
        the threshold. Use it for a fault that no retry fixes and that every
        caller would hit, such as a spent quota.
        """
        threshold = 1 if trip else self.config.failure_threshold
        reply = await self._scripts.breaker_record(
            keys=[self._hash, self._probe],
            args=[
                "success" if success else "failure",
                threshold,
                int(self.config.window * 1000),
                permit.token,
                self.config.min_calls,
                self.config.failure_rate,
                self.config.buckets,
            ],
        )
        before, after = _state(reply[0]), _state(reply[1])
        if before != after:
            await self._changed(before, after, failures=int(reply[2]))
        return after

    async def record_failure(self) -> State:
        """Count a failure seen outside ``call`` and return the state after it.

        It counts only while the breaker is closed, like the outcome of any
        call that is not the probe.
        """
        permit = Permit(verdict="allow", state="closed", retry_after=0.0)
        return await self.record(permit, success=False)

    async def release(self, permit: Permit) -> None:
        """Give back a probe lease without an outcome, so the next caller probes.

        Use it when a probe call was cancelled before it could tell whether
        the dependency works. Other permits need no release.
        """
        if not permit.token:
            return
        if await self._client.get(self._probe) == permit.token.encode():
            await self._client.delete(self._probe)
        logger.info("circuit breaker probe released breaker=%s", self.name)

    async def _changed(self, before: State, after: State, *, failures: int = 0) -> None:
        if after == "open":
            logger.info(
                "circuit breaker opened breaker=%s was=%s failures=%d cooldown=%.1fs",
                self.name,
                before,
                failures,
                self.config.cooldown,
            )
        elif after == "closed":
            logger.info("circuit breaker closed breaker=%s was=%s", self.name, before)
        else:
            logger.info(
                "circuit breaker half-open, probe let through breaker=%s", self.name
            )
        if self._on_change is None:
            return
        try:
            await self._on_change(self.name, before, after)
        except Exception:
            logger.exception(
                "breaker change listener failed breaker=%s was=%s now=%s",
                self.name,
                before,
                after,
            )

    async def state(self) -> BreakerState:
        """Return the shared state, with the calls and failures in the window."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(self._hash)
        pipe.time()
        raw, (seconds, micros) = await pipe.execute()
        values = {_text(k): _text(v) for k, v in raw.items()}
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        calls, failures = self._window_counts(values, now_ms)
        return BreakerState(
            name=self.name,
            state=_state(values.get("state", "closed")),
            failures=failures,
            calls=calls,
            opened_at_ms=int(values.get("opened_at", "0")),
            changed_at_ms=int(values.get("changed_at", "0")),
        )

    def _window_counts(self, values: dict[str, str], now_ms: int) -> tuple[int, int]:
        """Add up the buckets of the sliding window, as breaker_record.lua does.

        The window size comes from the hash, as the last recording instance
        stored it, and from this instance's config if none is stored yet.
        """
        buckets = int(values.get("buckets", self.config.buckets))
        window_ms = int(values.get("window_ms", int(self.config.window * 1000)))
        bucket_ms = max(1, window_ms // buckets)
        slot = now_ms // bucket_ms
        calls = failures = 0
        for index in range(buckets):
            value = values.get(f"b{index}")
            if value is None:
                continue
            bucket_slot, bucket_calls, bucket_failures = map(int, value.split(":"))
            if bucket_slot > slot - buckets:
                calls += bucket_calls
                failures += bucket_failures
        return calls, failures

    async def reset(self) -> None:
        """Close the breaker and forget its failures (an operator's override)."""
        await self._client.delete(self._hash, self._probe)
        logger.info("circuit breaker reset breaker=%s", self.name)

    async def call(
        self, function: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``function(*args, **kwargs)`` through the breaker and return its result.

        Raises ``BreakerOpenError`` without calling ``function`` while the
        breaker is open, or half-open with another caller's probe running.
        Any exception from ``function`` counts as a failure, except those in
        ``config.excluded``, and is re-raised.
        """
        permit = await self.acquire()
        if not permit.allowed:
            raise BreakerOpenError(self.name, permit.retry_after)
        try:
            result = await function(*args, **kwargs)
        except asyncio.CancelledError:
            await asyncio.shield(self.release(permit))
            raise
        except self.config.excluded:
            await self.record(permit, success=True)
            raise
        except Exception:
            await self.record(permit, success=False)
            raise
        await self.record(permit, success=True)
        return result


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _state(value: Any) -> State:
    text = _text(value)
    if text not in STATES:
        msg = f"unknown circuit breaker state {text!r} in Redis; reset the breaker"
        raise ValueError(msg)
    return text


def _verdict(value: Any) -> Verdict:
    text = _text(value)
    if text not in VERDICTS:
        msg = f"unknown circuit breaker verdict {text!r} from breaker_allow.lua"
        raise ValueError(msg)
    return text
