"""The error handler service: what happens after an event is dead-lettered.

The bus announces every dead letter of a durable subscription as a
``hivebus.deadlettered`` event on the durable channel ``hivebus.errors``. An
``ErrorHandler`` reads that channel in a consumer group of its own and, for
each announcement:

1. records the failure in the error context in Redis: counts by event type,
   by subscription (``CHANNEL/GROUP``), by error type and by source in the
   hash ``P:errors``, and the last ``recent_limit`` failures, newest first,
   in the list ``P:errors:recent``;
2. notifies the service that published the failed event with a
   ``hivebus.failure`` event on the durable channel
   ``hivebus.notify.<source>``, whose causation id is the failed event's id;
3. applies the breaker rules: if the failed subscription is named in
   ``breaker_rules``, it records a failure on that circuit breaker. A burst
   of dead letters then opens the breaker and pauses every consumer and
   ``CircuitBreaker.call`` guarded by it, in every process.

Step 1 runs exactly once per announcement, even when the announcement is
delivered twice, because its writes and an idempotency marker share one
transaction. Steps 2 and 3 write their marker after they act, so a crash
between the two repeats them once more: a second notice with the same
causation id, or one more breaker failure.

No notice is sent for a failed ``hivebus.failure`` event (that would loop),
for an entry that could not be decoded (it has no known source), or for a
source that is not a valid channel name; those are only counted.

``ErrorContext`` reads and resets the error context, for the Python API and
for ``hivebus errors show``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from hivebus.bus import DEAD_LETTERED_TYPE, ERRORS_CHANNEL
from hivebus.connection import Redis
from hivebus.errors import InvalidChannelError
from hivebus.events import Event
from hivebus.keys import Keys, check_channel
from hivebus.retry import RetryPolicy
from hivebus.subscription import Delivery

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from hivebus.bus import Bus

logger = logging.getLogger(__name__)

FAILURE_TYPE = "hivebus.failure"
NOTIFY_PREFIX = "hivebus.notify."
DEFAULT_GROUP = "hivebus-error-handler"
UNKNOWN = "(unknown)"  # the count key for a field an undecodable entry lacks
DIMENSIONS = ("event_type", "subscription", "error_type", "source")


def notify_channel(source: str) -> str:
    """Return the channel on which the service ``source`` receives failure notices."""
    return check_channel(NOTIFY_PREFIX + source)


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """One dead letter as the error handler records it."""

    dead_letter_id: str
    channel: str
    subscription: str
    event_id: str
    event_type: str
    source: str
    error_type: str
    error: str
    reason: str
    attempts: int
    time: str

    @classmethod
    def from_announcement(cls, announcement: Event[Any]) -> FailureRecord:
        """Build the record of a ``hivebus.deadlettered`` event."""
        data = announcement.data if isinstance(announcement.data, dict) else {}
        channel = str(data.get("channel") or UNKNOWN)
        group = str(data.get("subscription") or UNKNOWN)
        return cls(
            dead_letter_id=str(data.get("dead_letter_id") or ""),
            channel=channel,
            subscription=f"{channel}/{group}",
            event_id=str(data.get("event_id") or ""),
            event_type=str(data.get("event_type") or UNKNOWN),
            source=str(data.get("event_source") or UNKNOWN),
            error_type=str(data.get("error_type") or UNKNOWN),
            error=str(data.get("error") or ""),
            reason=str(data.get("reason") or ""),
            attempts=int(data.get("attempts") or 0),
            time=announcement.time.isoformat(timespec="milliseconds"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the record as plain JSON values."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ErrorSummary:
    """The error context: failure counts and the most recent failures."""

    total: int = 0
    by_event_type: dict[str, int] = field(default_factory=dict)
    by_subscription: dict[str, int] = field(default_factory=dict)
    by_error_type: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, int] = field(default_factory=dict)
    recent: list[FailureRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as plain JSON values."""
        return asdict(self)


class ErrorContext:
    """The failure counts and recent failures that the error handler keeps in Redis."""

    def __init__(self, client: Redis, keys: Keys, *, recent_limit: int = 100) -> None:
        if recent_limit < 1:
            msg = f"`recent_limit` must be at least 1, got {recent_limit!r}"
            raise ValueError(msg)
        self._client = client
        self._keys = keys
        self.recent_limit = recent_limit

    def queue_record(self, pipe: Pipeline, record: FailureRecord) -> None:
        """Queue the commands that record ``record`` on a transaction pipeline."""
        pipe.hincrby(self._keys.errors, "total", 1)
        for dimension in DIMENSIONS:
            pipe.hincrby(
                self._keys.errors, f"{dimension}:{getattr(record, dimension)}", 1
            )
        pipe.lpush(self._keys.errors_recent, json.dumps(record.to_dict()))
        pipe.ltrim(self._keys.errors_recent, 0, self.recent_limit - 1)

    async def read(self, *, limit: int | None = None) -> ErrorSummary:
        """Return the counts and up to ``limit`` recent failures, newest first."""
        count = self.recent_limit if limit is None else limit
        pipe = self._client.pipeline(transaction=True)
        pipe.hgetall(self._keys.errors)
        pipe.lrange(self._keys.errors_recent, 0, max(0, count - 1))
        counts, recent = await pipe.execute()
        grouped: dict[str, dict[str, int]] = {name: {} for name in DIMENSIONS}
        total = 0
        for raw_name, raw_value in counts.items():
            name, value = _text(raw_name), int(raw_value)
            dimension, sep, label = name.partition(":")
            if name == "total":
                total = value
            elif sep and dimension in grouped:
                grouped[dimension][label] = value
        records = [FailureRecord(**json.loads(item)) for item in recent][:count]
        return ErrorSummary(
            total=total,
            by_event_type=_sorted(grouped["event_type"]),
            by_subscription=_sorted(grouped["subscription"]),
            by_error_type=_sorted(grouped["error_type"]),
            by_source=_sorted(grouped["source"]),
            recent=records,
        )

    async def reset(self) -> None:
        """Forget every count and recent failure."""
        await self._client.delete(self._keys.errors, self._keys.errors_recent)
        logger.info("error context reset prefix=%s", self._keys.prefix)


class ErrorHandler:
    """A service that records, reports and acts on every dead letter.

    Create it before or after ``bus.start()``; it subscribes at once::

        bus = Bus(url, service="ops")
        handler = ErrorHandler(bus, breaker_rules={"orders/billing": "payments"})
        async with bus:
            ...
            summary = await handler.context.read()

    Args:
        group: the consumer group on ``hivebus.errors``. Every process that
            runs an error handler with the same group shares the work.
        recent_limit: failures kept in the recent list.
        notify: send ``hivebus.failure`` notices to the publishing services.
        breaker_rules: subscription (``CHANNEL/GROUP``) to breaker name. Each
            dead letter of that subscription counts as a failure of that
            breaker, with the breaker's config in ``bus.breaker(name)``.
            Give it the same config as the consumers that use the breaker.
        concurrency: announcements handled at once per process.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        group: str = DEFAULT_GROUP,
        recent_limit: int = 100,
        notify: bool = True,
        breaker_rules: Mapping[str, str] | None = None,
        concurrency: int = 8,
    ) -> None:
        self._bus = bus
        self._recent_limit = recent_limit
        self._notify = notify
        self.breaker_rules = dict(breaker_rules or {})
        self._context: ErrorContext | None = None
        self.handled = 0
        """Dead-letter announcements handled by this process."""
        self.notified = 0
        """Failure notices this process sent to publishing services."""
        bus.subscribe(
            ERRORS_CHANNEL,
            durable=True,
            group=group,
            raw=True,
            types=[DEAD_LETTERED_TYPE],
            concurrency=concurrency,
            retry=RetryPolicy(max_attempts=5, base=0.5, cap=10.0),
        )(self.handle)

    @property
    def context(self) -> ErrorContext:
        """The error context in Redis; available once the bus is connected."""
        if self._context is None:
            self._context = ErrorContext(
                self._bus.client, self._bus.keys, recent_limit=self._recent_limit
            )
        return self._context

    async def handle(self, announcement: Event[Any], delivery: Delivery) -> None:
        """Record, report and apply the breaker rules for one dead letter."""
        record = FailureRecord.from_announcement(announcement)
        await delivery.once(
            "record", lambda pipe: self.context.queue_record(pipe, record)
        )
        if self._notify and self._should_notify(record):
            await delivery.run_once(
                "notify", lambda: self._send_notice(announcement, record)
            )
        breaker = self.breaker_rules.get(record.subscription)
        if breaker is not None:
            await delivery.run_once("breaker", lambda: self._trip(breaker, record))
        self.handled += 1
        logger.info(
            "dead letter handled dead_letter_id=%s event_id=%s subscription=%s "
            "error_type=%s",
            record.dead_letter_id,
            record.event_id or "-",
            record.subscription,
            record.error_type,
        )

    def _should_notify(self, record: FailureRecord) -> bool:
        if record.event_type == FAILURE_TYPE or record.source == UNKNOWN:
            return False
        try:
            notify_channel(record.source)
        except InvalidChannelError:
            logger.warning(
                "failure notice skipped, the source is not a valid channel name "
                "dead_letter_id=%s source=%r",
                record.dead_letter_id,
                record.source,
            )
            return False
        return True

    async def _send_notice(
        self, announcement: Event[Any], record: FailureRecord
    ) -> None:
        data = record.to_dict()
        data.pop("source")
        await self._bus.publish(
            notify_channel(record.source),
            data,
            type=FAILURE_TYPE,
            raw=True,
            durable=True,
            causation_id=record.event_id or announcement.id,
            correlation_id=announcement.correlationid,
        )
        self.notified += 1
        logger.info(
            "failure notice sent source=%s event_id=%s dead_letter_id=%s",
            record.source,
            record.event_id or "-",
            record.dead_letter_id,
        )

    async def _trip(self, name: str, record: FailureRecord) -> None:
        state = await self._bus.breaker(name).record_failure()
        logger.info(
            "dead letter counted as breaker failure breaker=%s subscription=%s "
            "state=%s",
            name,
            record.subscription,
            state,
        )


def _sorted(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
