"""Versioned contexts: the manager that stores them and the per-service cache."""

from __future__ import annotations

from hivebus.context.cache import CacheStats, ContextCache
from hivebus.context.manager import ContextManager
from hivebus.context.models import (
    CONTEXT_CHANNEL,
    STATUS_TYPE,
    Context,
    ContextDiff,
    ContextStatus,
    ValueChange,
)

__all__ = [
    "CONTEXT_CHANNEL",
    "STATUS_TYPE",
    "CacheStats",
    "Context",
    "ContextCache",
    "ContextDiff",
    "ContextManager",
    "ContextStatus",
    "ValueChange",
]
