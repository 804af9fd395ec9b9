"""hivebus: an event bus on Redis for teams of services and AI agents."""

from __future__ import annotations

import typing as _typing

__version__ = "0.1.0"  # set before the imports below, which read it

from hivebus.breaker import BreakerConfig, CircuitBreaker
from hivebus.bus import Bus
from hivebus.config import Settings
from hivebus.context.cache import ContextCache
from hivebus.context.manager import ContextManager
from hivebus.context.models import Context
from hivebus.dlq import DeadLetterEntry, DeadLetterQueue
from hivebus.error_handler import ErrorHandler
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

if _typing.TYPE_CHECKING:
    from hivebus.team.runner import Team


def __getattr__(name: str) -> _typing.Any:
    """Import ``Team`` on first use: the team pulls in HTTP and terminal libraries
    that a process running only the bus does not need."""
    if name == "Team":
        from hivebus.team.runner import Team

        return Team
    msg = f"module 'hivebus' has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = [
    "BreakerConfig",
    "BreakerOpenError",
    "Bus",
    "CircuitBreaker",
    "ConfigError",
    "Context",
    "ContextCache",
    "ContextConflictError",
    "ContextManager",
    "DeadLetter",
    "DeadLetterEntry",
    "DeadLetterQueue",
    "Delivery",
    "ErrorHandler",
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
    "Team",
    "__version__",
]
