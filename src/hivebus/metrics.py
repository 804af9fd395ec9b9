"""Prometheus metrics of the bus, and the counters every process shares in Redis.

The bus calls the hook functions below as events flow: ``published``,
``handler_timer`` (around each handler run), ``retried``, ``dead_lettered``
and ``context_cache``. Each hook updates this process's prometheus-client
metrics in the default registry, so any exporter of that registry shows
them. The event counters also gather in memory and a background task adds
them to the ``P:stats`` hash about once a second, so that the dashboard
can show totals over every process on one Redis. A hook never waits for
Redis: counts made while a write is in flight go out with the next one, and
counts that cannot be written while Redis is unreachable are kept and
written later. ``close`` writes what is left when a bus stops.

``render`` returns the text that the dashboard serves at ``/metrics``: this
process's metrics, followed by the shared counters and breaker states read
from Redis (named ``hivebus_shared_*``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hivebus.connection import Redis
from hivebus.keys import Keys

if TYPE_CHECKING:
    from hivebus.events import Event

logger = logging.getLogger(__name__)

# Handlers range from sub-millisecond bookkeeping to model calls of minutes.
HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Counts gather for this long before one write adds them all, so a busy
# process costs Redis about one pipeline a second for its counters.
WRITE_INTERVAL = 1.0
WRITE_RETRY_DELAY = 5.0  # seconds before counts are written again after a failure
BREAKER_STATES = ("closed", "open", "half_open")

EVENTS_PUBLISHED = PromCounter(
    "hivebus_events_published",
    "Events this process published, by event type.",
    ["type"],
)
EVENTS_HANDLED = PromCounter(
    "hivebus_events_handled",
    "Handler runs in this process, by subscription, event type and outcome.",
    ["subscription", "type", "outcome"],
)
EVENTS_RETRIED = PromCounter(
    "hivebus_events_retried",
    "Failed handler runs this process scheduled for a retry.",
    ["subscription", "type"],
)
EVENTS_DEAD_LETTERED = PromCounter(
    "hivebus_events_dead_lettered",
    "Events this process moved to the dead-letter queue.",
    ["subscription", "type"],
)
HANDLER_SECONDS = PromHistogram(
    "hivebus_handler_duration_seconds",
    "Seconds one handler run took, failed runs included.",
    ["subscription", "type"],
    buckets=HANDLER_BUCKETS,
)
REQUEST_SECONDS = PromHistogram(
    "hivebus_http_request_duration_seconds",
    "Seconds the dashboard and HTTP API took to answer, by route and status.",
    ["method", "route", "status"],
)
CONTEXT_CACHE_HITS = PromCounter(
    "hivebus_context_cache_hits",
    "Context reads served from this process's local cache.",
)
CONTEXT_CACHE_MISSES = PromCounter(
    "hivebus_context_cache_misses",
    "Context reads that had to fetch the context from Redis.",
)


# -- counts shared through Redis ----------------------------------------------


@dataclass(slots=True)
class _Share:
    """Counts made through one Redis client that are not yet in Redis."""

    client: Redis
    keys: Keys
    counts: Counter[str] = field(default_factory=Counter)
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    writer: asyncio.Task[None] | None = None
    waiting: bool = False
    retry_at: float = 0.0
    failing: bool = False

    def add(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount
        self._schedule()

    def add_seconds(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def _schedule(self) -> None:
        if self.writer is not None and not self.writer.done():
            return
        if time.monotonic() < self.retry_at:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # counted outside a loop: written with the next count or close
        self.writer = loop.create_task(self._write_later(), name="hivebus-metrics")

    async def _write_later(self) -> None:
        self.waiting = True
        try:
            await asyncio.sleep(WRITE_INTERVAL)
        finally:
            self.waiting = False
        await self.write()

    async def write(self) -> None:
        """Add the gathered counts to the shared hash until none are left."""
        while self.counts or self.seconds:
            counts, self.counts = self.counts, Counter()
            seconds, self.seconds = self.seconds, defaultdict(float)
            pipe = self.client.pipeline(transaction=False)
            for name, amount in counts.items():
                pipe.hincrby(self.keys.stats, name, amount)
            for name, value in seconds.items():
                pipe.hincrbyfloat(self.keys.stats, name, value)
            try:
                await pipe.execute()
            except BaseException as exc:
                self._keep(counts, seconds)
                if isinstance(exc, Exception):
                    self._failed(exc)
                    return
                raise
            if self.failing:
                self.failing = False
                logger.info("shared counters written again key=%s", self.keys.stats)

    def _keep(self, counts: Counter[str], seconds: dict[str, float]) -> None:
        self.counts.update(counts)
        for name, value in seconds.items():
            self.seconds[name] += value

    def _failed(self, error: Exception) -> None:
        self.retry_at = time.monotonic() + WRITE_RETRY_DELAY
        level = logging.DEBUG if self.failing else logging.WARNING
        self.failing = True
        logger.log(
            level,
            "shared counters not written, kept for the next write key=%s "
            "pending=%d error=%r",
            self.keys.stats,
            sum(self.counts.values()),
            error,
        )


_shares: dict[int, _Share] = {}


def _share(client: Redis, keys: Keys) -> _Share:
    share = _shares.get(id(client))
    if share is None or share.client is not client:
        share = _Share(client, keys)
        _shares[id(client)] = share
    return share


async def close(client: Redis | None) -> None:
    """Write the counts made through ``client`` and forget it; call before closing."""
    if client is None:
        return
    share = _shares.pop(id(client), None)
    if share is None or share.client is not client:
        return
    if share.writer is not None:
        if share.waiting:
            share.writer.cancel()  # a write in flight is left to finish
        await asyncio.gather(share.writer, return_exceptions=True)
    await share.write()


# -- hooks the bus calls ------------------------------------------------------


def published(client: Redis, keys: Keys, event_types: Iterable[str]) -> None:
    """Count events that were published (stored and delivered) through ``client``."""
    share = _share(client, keys)
    for event_type in event_types:
        _published_child(event_type).inc()
        share.add(f"published:{event_type}")


def retried(client: Redis, keys: Keys, subscription: str, event_type: str) -> None:
    """Count a failed handler run whose event was scheduled for another attempt."""
    EVENTS_RETRIED.labels(subscription, event_type).inc()
    _share(client, keys).add(f"retried:{subscription}:{event_type}")


def dead_lettered(
    client: Redis, keys: Keys, subscription: str, event: Event[Any] | None
) -> None:
    """Count an event (or an undecodable entry, as type "") dead-lettered."""
    event_type = event.type if event is not None else ""
    EVENTS_DEAD_LETTERED.labels(subscription, event_type).inc()
    _share(client, keys).add(f"dead_lettered:{subscription}:{event_type}")


def context_cache(*, hit: bool) -> None:
    """Count one context read, served from the local cache (hit) or not (miss)."""
    (CONTEXT_CACHE_HITS if hit else CONTEXT_CACHE_MISSES).inc()


@functools.cache
def _published_child(event_type: str) -> Any:
    """Return the labelled publish counter once per event type."""
    return EVENTS_PUBLISHED.labels(event_type)


@functools.cache
def _handled_child(subscription: str, event_type: str, outcome: str) -> Any:
    """Return the labelled counter once per label set; ``labels`` is slow."""
    return EVENTS_HANDLED.labels(subscription, event_type, outcome)


@functools.cache
def _seconds_child(subscription: str, event_type: str) -> Any:
    """Return the labelled histogram once per label set."""
    return HANDLER_SECONDS.labels(subscription, event_type)


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Record the latency of one HTTP request to the dashboard or API."""
    REQUEST_SECONDS.labels(method, route, str(status)).observe(seconds)


class handler_timer:  # lowercase: used like a function, in `async with`
    """Time one handler run and count its outcome (success or failure).

    A run that is cancelled (shutdown, or the caller's task cancelled) is
    neither: it is not counted.
    """

    __slots__ = ("_client", "_keys", "_start", "_subscription", "_type")

    def __init__(
        self, client: Redis, keys: Keys, subscription: str, event_type: str
    ) -> None:
        self._client = client
        self._keys = keys
        self._subscription = subscription
        self._type = event_type
        self._start = 0.0

    async def __aenter__(self) -> None:
        self._start = time.perf_counter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            return
        seconds = time.perf_counter() - self._start
        outcome = "success" if exc_type is None else "failure"
        _handled_child(self._subscription, self._type, outcome).inc()
        _seconds_child(self._subscription, self._type).observe(seconds)
        share = _share(self._client, self._keys)
        name = f"{self._subscription}:{self._type}"
        share.add_seconds(f"seconds:{name}", seconds)
        share.add(f"{'handled' if exc_type is None else 'failed'}:{name}")


# -- reading the shared counters ----------------------------------------------


@dataclass(frozen=True, slots=True)
class SharedCounts:
    """Totals over every process, as kept in the ``P:stats`` hash.

    ``handled``, ``failed``, ``retried``, ``dead_lettered`` and ``seconds``
    are keyed by (subscription, event type); ``published`` by event type and
    ``unobserved`` (events that reached no listener or group) by channel.
    """

    published: dict[str, int]
    handled: dict[tuple[str, str], int]
    failed: dict[tuple[str, str], int]
    retried: dict[tuple[str, str], int]
    dead_lettered: dict[tuple[str, str], int]
    seconds: dict[tuple[str, str], float]
    unobserved: dict[str, int]

    def total(self, name: str) -> int:
        """Return the sum of one counter over all its labels."""
        values: dict[Any, int] = getattr(self, name)
        return sum(values.values())

    def to_dict(self) -> dict[str, Any]:
        """Return the counts as JSON values, pairs written ``subscription|type``."""

        def flat(values: dict[Any, Any]) -> dict[str, Any]:
            return {
                "|".join(k) if isinstance(k, tuple) else k: v for k, v in values.items()
            }

        names = ("published", "handled", "failed", "retried", "dead_lettered")
        data: dict[str, Any] = {name: flat(getattr(self, name)) for name in names}
        data["unobserved"] = dict(self.unobserved)
        data["totals"] = {name: self.total(name) for name in names}
        return data


async def read_shared(client: Redis, keys: Keys) -> SharedCounts:
    """Read the counters that every process adds to in Redis."""
    raw = await client.hgetall(keys.stats)
    parsed = parse_shared({_text(k): _text(v) for k, v in raw.items()})
    return parsed


def parse_shared(fields: dict[str, str]) -> SharedCounts:
    """Sort the fields of the ``P:stats`` hash into ``SharedCounts``."""
    by_type: dict[str, dict[str, int]] = {"published": {}, "unobserved": {}}
    by_pair: dict[str, dict[tuple[str, str], int]] = {
        name: {} for name in ("handled", "failed", "retried", "dead_lettered")
    }
    seconds: dict[tuple[str, str], float] = {}
    for name, value in fields.items():
        kind, _, rest = name.partition(":")
        if kind in by_type:
            by_type[kind][rest] = int(value)
            continue
        subscription, _, event_type = rest.partition(":")
        if kind in by_pair:
            by_pair[kind][(subscription, event_type)] = int(value)
        elif kind == "seconds":
            seconds[(subscription, event_type)] = float(value)
    return SharedCounts(
        published=by_type["published"],
        unobserved=by_type["unobserved"],
        seconds=seconds,
        **by_pair,
    )


# -- exposition ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakerReading:
    """One breaker's state for the ``hivebus_shared_breaker_state`` gauge."""

    name: str
    state: str
    failures: int


class _SharedCollector(Collector):
    """Turn one reading of the shared counters into metric families."""

    def __init__(
        self,
        shared: SharedCounts,
        breakers: list[BreakerReading],
        context: dict[str, int],
    ) -> None:
        self._shared = shared
        self._breakers = breakers
        self._context = context

    def collect(self) -> Iterator[Any]:
        shared = self._shared
        yield _counter(
            "published", "Events published by every process.", ["type"],
            {(k,): v for k, v in shared.published.items()},
        )  # fmt: skip
        for name, text in (
            ("handled", "Successful handler runs in every process."),
            ("failed", "Failed handler runs in every process."),
            ("retried", "Handler failures scheduled for a retry, every process."),
            ("dead_lettered", "Events dead-lettered by every process."),
        ):
            yield _counter(name, text, ["subscription", "type"], getattr(shared, name))
        yield _counter(
            "unobserved", "Events that reached no listener or group.", ["channel"],
            {(k,): v for k, v in shared.unobserved.items()},
        )  # fmt: skip
        yield self._handler_seconds()
        yield self._breaker_states()
        yield from self._context_counters()

    def _handler_seconds(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "hivebus_shared_handler_seconds",
            "Seconds spent in handlers by every process.",
            labels=["subscription", "type"],
        )
        for (subscription, event_type), value in sorted(self._shared.seconds.items()):
            family.add_metric([subscription, event_type], value)
        return family

    def _breaker_states(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "hivebus_shared_breaker_state",
            "1 for a breaker's current state (closed, open or half_open), else 0.",
            labels=["breaker", "state"],
        )
        for breaker in self._breakers:
            for state in BREAKER_STATES:
                family.add_metric([breaker.name, state], float(breaker.state == state))
        return family

    def _context_counters(self) -> Iterator[CounterMetricFamily]:
        for name in ("cache_hits", "cache_misses"):
            family = CounterMetricFamily(
                f"hivebus_shared_context_{name}",
                f"Context {name.replace('_', ' ')} in every process.",
            )
            family.add_metric([], self._context.get(name, 0))
            yield family


def _counter(
    name: str, text: str, labels: list[str], values: dict[tuple[str, ...], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"hivebus_shared_events_{name}", text, labels=labels)
    for label_values, value in sorted(values.items()):
        family.add_metric(list(label_values), value)
    return family


def render(
    shared: SharedCounts,
    breakers: list[BreakerReading],
    context: dict[str, int] | None = None,
) -> bytes:
    """Return the Prometheus text of this process's metrics and the shared ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SharedCollector(shared, breakers, context or {}))
    return generate_latest(REGISTRY) + generate_latest(registry)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
