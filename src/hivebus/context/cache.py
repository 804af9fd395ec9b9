"""A service's local cache of contexts, bounded in size and kept fresh by versions.

Three things keep a cached context from being served stale:

- a read that names a version (``min_version``, as a request's
  ``contextversion`` does) fetches the context when the cached one is older,
  so a handler never gets a context older than its request names;
- a ``hivebus.context.status`` event for a newer version drops the entry;
- an entry older than ``max_age`` seconds is fetched again, which bounds
  staleness when status events are missed (Pub/Sub is at most once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hivebus import metrics
from hivebus.context.models import (
    CONTEXT_CHANNEL,
    STATUS_TYPE,
    Context,
    ContextStatus,
)
from hivebus.errors import ConfigError, ContextValidationError
from hivebus.events import Event

if TYPE_CHECKING:
    from hivebus.context.manager import ContextManager

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    context: Context
    fetched_at: float


@dataclass(slots=True)
class CacheStats:
    """Counters of one cache since it was made."""

    hits: int = 0
    misses: int = 0
    invalidations: int = 0
    evictions: int = 0


class ContextCache:
    """Contexts in memory with their versions, least recently used evicted first.

    Args:
        max_entries: contexts kept at most; the least recently used goes first.
        max_age: seconds an entry is served before it is fetched again; None
            keeps entries until a status event or a newer version replaces them.
        listen: drop entries when a status event announces a newer version.
            This subscribes to the ``hivebus.contexts`` broadcast channel on
            the manager's bus.
    """

    def __init__(
        self,
        manager: ContextManager,
        *,
        max_entries: int = 1024,
        max_age: float | None = 60.0,
        listen: bool = True,
    ) -> None:
        if max_entries < 1 or (max_age is not None and max_age <= 0):
            msg = (
                f"`max_entries` ({max_entries!r}) must be at least 1 and "
                f"`max_age` ({max_age!r}) above 0 or None"
            )
            raise ConfigError(msg)
        self._manager = manager
        self._service = manager.bus.settings.service
        self.max_entries = max_entries
        self.max_age = max_age
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._loading: dict[str, asyncio.Task[Context]] = {}
        self._announced: dict[str, int] = {}
        self.stats = CacheStats()
        if listen:
            manager.bus.subscribe(CONTEXT_CHANNEL, types=[STATUS_TYPE], concurrency=1)(
                self._on_status
            )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, context_id: object) -> bool:
        return context_id in self._entries

    def peek(self, context_id: str) -> Context | None:
        """Return the cached context without fetching or counting, or None."""
        entry = self._entries.get(context_id)
        return entry.context if entry is not None else None

    async def get(self, context_id: str, *, min_version: int | None = None) -> Context:
        """Return a context at ``min_version`` or newer, from memory when it can.

        Raises:
            ContextNotFoundError: the context does not exist.
            ContextValidationError: the context has no version ``min_version``
                yet.
        """
        entry = self._entries.get(context_id)
        if entry is not None and self._usable(entry, min_version):
            self._entries.move_to_end(context_id)
            self.stats.hits += 1
            self._manager.metrics.count("cache_hits", service=self._service)
            metrics.context_cache(hit=True)
            return entry.context
        self.stats.misses += 1
        self._manager.metrics.count("cache_misses", service=self._service)
        metrics.context_cache(hit=False)
        context = await self._load(context_id)
        if min_version is not None and context.version < min_version:
            context = await self._fetch(context_id)
        if min_version is not None and context.version < min_version:
            msg = (
                f"context {context_id!r} has no version {min_version}: it is at "
                f"version {context.version}"
            )
            raise ContextValidationError(msg)
        return context

    def invalidate(self, context_id: str) -> None:
        """Drop the cached entry of ``context_id``, if any."""
        if self._entries.pop(context_id, None) is not None:
            self.stats.invalidations += 1

    def _usable(self, entry: _Entry, min_version: int | None) -> bool:
        if min_version is not None and entry.context.version < min_version:
            return False
        if self.max_age is None:
            return True
        return time.monotonic() - entry.fetched_at < self.max_age

    async def _load(self, context_id: str) -> Context:
        """Fetch a context, sharing one fetch among concurrent callers."""
        task = self._loading.get(context_id)
        if task is None:
            task = asyncio.ensure_future(self._fetch(context_id))
            self._loading[context_id] = task
            task.add_done_callback(lambda done: self._loaded(context_id, done))
        return await asyncio.shield(task)

    def _loaded(self, context_id: str, task: asyncio.Task[Context]) -> None:
        if self._loading.get(context_id) is task:
            del self._loading[context_id]
        if not task.cancelled():
            task.exception()  # retrieved here, so no waiter left means no warning

    async def _fetch(self, context_id: str) -> Context:
        context = await self._manager.get(context_id)
        self._store(context)
        return context

    def _store(self, context: Context) -> None:
        announced = self._announced.pop(context.id, 0)
        if context.version < announced:
            return  # a newer version was announced while this one was fetched
        current = self._entries.get(context.id)
        if current is not None and current.context.version > context.version:
            return
        self._entries[context.id] = _Entry(context, time.monotonic())
        self._entries.move_to_end(context.id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    async def _on_status(self, event: Event[Any]) -> None:
        status = event.data
        if not isinstance(status, ContextStatus) or status.status == "rejected":
            return
        entry = self._entries.get(status.context_id)
        if entry is not None and entry.context.version < status.version:
            self.invalidate(status.context_id)
            logger.debug(
                "cached context invalidated context_id=%s cached=%d announced=%d",
                status.context_id,
                entry.context.version,
                status.version,
            )
        if status.context_id in self._loading:
            known = self._announced.get(status.context_id, 0)
            self._announced[status.context_id] = max(known, status.version)
