"""Retry policies: how many attempts, how long to wait, which errors to retry.

A durable subscription runs its handler up to ``max_attempts`` times per
event. After a failed attempt the policy decides, in ``RetryPolicy.decide``,
whether the entry waits in the group's retry set for another attempt or goes
to the dead-letter queue.

Ordering: hivebus keeps no order across retries. A retried event runs again
after its backoff, while events published after it go ahead, so a failure
can reorder the events of one channel and of one subject. Handlers that care
about order use what each event carries: its ``id``, its ``causationid`` and
``correlationid``, and the attempt number in ``Delivery.attempt``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from hivebus.errors import DeadLetter, InvalidEventError, RetryLater

Jitter = Literal["full", "none"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for an entry whose handler failed.

    Attributes:
        retry: whether the entry runs again.
        delay: seconds to wait before the next attempt, when ``retry``.
        reason: why the entry goes to the dead-letter queue, when not ``retry``.
        exhausted: the failed attempt was the last one the policy allows.
    """

    retry: bool
    delay: float = 0.0
    reason: str = ""
    exhausted: bool = False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a durable subscription retries a failing entry.

    The wait after failed attempt ``n`` is drawn from ``[0, ceiling(n)]``,
    where ``ceiling(n) = min(cap, base * 2 ** (n - 1))``.

    Args:
        max_attempts: handler runs per event, the first included; after the
            last failure the event goes to the dead-letter queue.
        base: seconds of the first backoff ceiling; it doubles per attempt.
        cap: seconds that no backoff exceeds.
        jitter: ``"full"`` draws each delay uniformly from 0 to the ceiling,
            which spreads the retries of many failing events; ``"none"`` waits
            the ceiling exactly.
        retry_on: exception types that are retried; any other exception goes
            to the dead-letter queue at once. Empty means every exception.
        never_retry: exception types that always go to the dead-letter queue.

    ``DeadLetter`` always goes to the dead-letter queue, and ``RetryLater``
    is always retried while attempts are left, regardless of these two lists.
    """

    max_attempts: int = 5
    base: float = 0.5
    cap: float = 60.0
    jitter: Jitter = "full"
    retry_on: tuple[type[BaseException], ...] = ()
    never_retry: tuple[type[BaseException], ...] = field(
        default=(DeadLetter, InvalidEventError)
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            msg = f"`max_attempts` must be at least 1, got {self.max_attempts!r}"
            raise ValueError(msg)
        if self.base < 0 or self.cap < 0:
            msg = (
                f"`base` and `cap` must not be negative, got {self.base!r} "
                f"and {self.cap!r}"
            )
            raise ValueError(msg)
        if self.jitter not in ("full", "none"):
            msg = f"`jitter` must be 'full' or 'none', got {self.jitter!r}"
            raise ValueError(msg)
        for name in ("retry_on", "never_retry"):
            for kind in getattr(self, name):
                if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                    msg = f"`{name}` must hold exception classes, got {kind!r}"
                    raise ValueError(msg)

    def ceiling(self, attempt: int) -> float:
        """Return the longest wait after failed attempt number ``attempt``."""
        exponent = min(max(0, attempt - 1), 64)  # 2**64 * base is past any cap
        return float(min(self.cap, self.base * 2**exponent))

    def delay(self, attempt: int) -> float:
        """Return the seconds to wait after failed attempt number ``attempt``."""
        ceiling = self.ceiling(attempt)
        if self.jitter == "none":
            return ceiling
        return random.uniform(0, ceiling)

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Tell whether ``error`` on attempt ``attempt`` earns another attempt."""
        return self.decide(error, attempt).retry

    def decide(self, error: BaseException, attempt: int) -> Decision:
        """Decide whether failed attempt ``attempt`` is retried, and after how long."""
        name = type(error).__name__
        if isinstance(error, DeadLetter):
            return Decision(False, reason=f"dead-lettered by the handler: {error}")
        if attempt >= self.max_attempts:
            reason = f"retries exhausted after {attempt} attempt(s)"
            return Decision(False, reason=reason, exhausted=True)
        if isinstance(error, RetryLater):
            requested = error.delay
            delay = self.delay(attempt) if requested is None else max(0.0, requested)
            return Decision(True, delay=delay)
        if isinstance(error, self.never_retry):
            return Decision(False, reason=f"not retried ({name} is never retried)")
        if self.retry_on and not isinstance(error, self.retry_on):
            return Decision(False, reason=f"not retried ({name} is not in retry_on)")
        return Decision(True, delay=self.delay(attempt))


NO_RETRY = RetryPolicy(max_attempts=1)
