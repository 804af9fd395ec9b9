"""Retry policies: how many attempts, how long to wait, which errors to retry."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hivebus.errors import DeadLetter, InvalidEventError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a durable subscription retries a failing entry.

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
    """

    max_attempts: int = 5
    base: float = 0.5
    cap: float = 60.0
    jitter: str = "full"
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

    def ceiling(self, attempt: int) -> float:
        """Return the longest wait after failed attempt number ``attempt``."""
        return float(min(self.cap, self.base * 2 ** max(0, attempt - 1)))

    def delay(self, attempt: int) -> float:
        """Return the seconds to wait after failed attempt number ``attempt``."""
        ceiling = self.ceiling(attempt)
        if self.jitter == "none":
            return ceiling
        return random.uniform(0, ceiling)

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Tell whether ``error`` on attempt ``attempt`` earns another attempt."""
        if attempt >= self.max_attempts:
            return False
        if isinstance(error, self.never_retry):
            return False
        return not self.retry_on or isinstance(error, self.retry_on)


NO_RETRY = RetryPolicy(max_attempts=1)
