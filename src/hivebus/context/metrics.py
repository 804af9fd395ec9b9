"""Context metrics, counted in the process and added to shared Redis counters.

Counting a cache hit must not cost a round trip, or the cache would be
pointless. Counts therefore gather in memory, and one background write adds
them to the ``P:ctx:metrics`` hash. Counts made while that write is in
flight go out in the next one. ``flush`` writes what is left.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from hivebus._tasks import TaskSet
from hivebus.connection import TRANSIENT_ERRORS, Redis
from hivebus.keys import Keys

logger = logging.getLogger(__name__)

TOP_SIZES = 10  # largest contexts listed by ``read``

COUNTERS = (
    "created",
    "reads",
    "updates",
    "conflicts",
    "validation_failures",
    "rejected_events",
    "cache_hits",
    "cache_misses",
)


class ContextMetrics:
    """Counters and sizes of contexts, shared by every process on one Redis."""

    def __init__(self, client: Callable[[], Redis], keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._counts: Counter[str] = Counter()
        self._sizes: dict[str, int] = {}
        self._background = TaskSet()
        self._writer: Any = None

    def count(self, name: str, amount: int = 1, *, service: str | None = None) -> None:
        """Add ``amount`` to counter ``name`` and, if given, to ``name:service``."""
        self._counts[name] += amount
        if service is not None:
            self._counts[f"{name}:{service}"] += amount
        self._schedule()

    def size(self, context_id: str, size: int) -> None:
        """Record the current size in bytes of a context's data."""
        self._sizes[context_id] = size
        self._schedule()

    def _schedule(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = self._background.spawn(
                self._write(), name="hivebus-context-metrics"
            )

    async def _write(self) -> None:
        while self._counts or self._sizes:
            counts, self._counts = self._counts, Counter()
            sizes, self._sizes = self._sizes, {}
            pipe = self._client().pipeline(transaction=False)
            for name, amount in counts.items():
                pipe.hincrby(self._keys.context_metrics, name, amount)
            if sizes:
                pipe.zadd(self._keys.context_sizes, sizes)
            try:
                await pipe.execute()
            except TRANSIENT_ERRORS as exc:
                self._counts.update(counts)
                self._sizes = {**sizes, **self._sizes}
                logger.warning("context metrics not written, kept error=%s", exc)
                return

    async def flush(self) -> None:
        """Write every count made so far to Redis."""
        await self._background.wait()
        if self._counts or self._sizes:
            await self._write()

    async def read(self) -> dict[str, Any]:
        """Return the shared counters, the number of contexts and the largest ones."""
        await self.flush()
        client = self._client()
        raw = await client.hgetall(self._keys.context_metrics)
        counters = {name: 0 for name in COUNTERS}
        counters.update({_text(k): int(v) for k, v in raw.items()})
        total = await client.zcard(self._keys.context_sizes)
        largest: Any = await client.zrevrange(
            self._keys.context_sizes, 0, TOP_SIZES - 1, withscores=True
        )
        return {
            **counters,
            "contexts": int(total),
            "largest": [
                {"context_id": _text(member), "bytes": int(score)}
                for member, score in largest
            ],
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
