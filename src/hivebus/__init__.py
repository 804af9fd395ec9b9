"""hivebus: an event bus on Redis for teams of services and AI agents."""

from __future__ import annotations

from hivebus.breaker import BreakerConfig, CircuitBreaker
from hivebus.bus import Bus
from hivebus.config import Settings
from hivebus.dlq import DeadLetterEntry, DeadLetterQueue
from hivebus.errors import (
    BreakerOpenError,
    ConfigError,
    ContextConflictError,
    DeadLetter,
    EventNotFoundError,
    HivebusError,
    InvalidEventError,
    RedisUnavailableError,
    RemoteError,
    RequestTimeoutError,
    RetryLater,
)
from hivebus.events import Event, EventTypes
from hivebus.publisher import PublishResult
from hivebus.retry import RetryPolicy
from hivebus.subscription import Delivery

__version__ = "0.1.0"

__all__ = [
    "BreakerConfig",
    "BreakerOpenError",
    "Bus",
    "CircuitBreaker",
    "ConfigError",
    "ContextConflictError",
    "DeadLetter",
    "DeadLetterEntry",
    "DeadLetterQueue",
    "Delivery",
    "Event",
    "EventNotFoundError",
    "EventTypes",
    "HivebusError",
    "InvalidEventError",
    "PublishResult",
    "RedisUnavailableError",
    "RemoteError",
    "RequestTimeoutError",
    "RetryLater",
    "RetryPolicy",
    "Settings",
    "__version__",
]
