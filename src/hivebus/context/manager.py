"""The context manager: create, read, update, diff and audit versioned contexts.

Every update is a compare-and-set on the version, done by one Lua script:
an update made from version N writes N+1 only if the context is still at N,
and otherwise raises ``ContextConflictError`` without writing anything.
``update_with_retry`` re-reads and re-applies a change function until it
wins. Each version is kept for ``retention`` seconds, so ``history`` and
``diff`` reach back that far.

Every change is announced on the ``hivebus.contexts`` broadcast channel as a
``hivebus.context.status`` event (created, updated or rejected), which
context caches use to drop stale entries.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from hivebus.config import DAY
from hivebus.context.diff import diff_contexts
from hivebus.context.metrics import ContextMetrics
from hivebus.context.models import (
    CONTEXT_CHANNEL,
    STATUS_TYPE,
    Context,
    ContextDiff,
    ContextStatus,
    StatusKind,
)
from hivebus.context.schemas import DEFAULT_MAX_BYTES, ContextData, ContextSchemas
from hivebus.context.store import ContextStore, NewVersion, to_context
from hivebus.context.validation import (
    ContextHandler,
    GuardedHandler,
    load_context,
    validated,
)
from hivebus.errors import (
    ConfigError,
    ContextConflictError,
    ContextError,
    ContextNotFoundError,
    ContextValidationError,
)
from hivebus.events import Event, new_event_id
from hivebus.keys import check_name

if TYPE_CHECKING:
    from hivebus.bus import Bus
    from hivebus.context.cache import ContextCache

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)
Change = Callable[[Context], ContextData | Awaitable[ContextData | None] | None]

DEFAULT_ATTEMPTS = 10
RETRY_PAUSE_CAP = 0.05  # seconds; longest random pause between retried updates


class ContextManager:
    """Create and update contexts stored in the Redis of ``bus``.

    Args:
        retention: seconds each version is kept for history and diffs.
        max_bytes: largest context data, as JSON; larger updates are rejected.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        retention: float = 7 * DAY,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if retention <= 0 or max_bytes <= 0:
            msg = (
                f"`retention` ({retention!r}) and `max_bytes` ({max_bytes!r}) "
                "must be above 0"
            )
            raise ConfigError(msg)
        self.bus = bus
        self.schemas = ContextSchemas(max_bytes)
        self._store = ContextStore(bus.keys, retention)
        self.metrics = ContextMetrics(lambda: bus.client, bus.keys)
        if STATUS_TYPE not in bus.types:
            bus.types.register(STATUS_TYPE, ContextStatus)

    def register_schema(self, name: str, model: type[ModelT]) -> type[ModelT]:
        """Register ``model`` as context schema ``name`` and return it."""
        return self.schemas.register(name, model)

    def _encode(self, context_id: str, schema: str | None, data: Any) -> str:
        try:
            return self.schemas.encode(context_id, schema, data)
        except ContextValidationError:
            self.metrics.count("validation_failures")
            raise

    # -- create and read -------------------------------------------------

    async def create(
        self,
        data: ContextData,
        *,
        owner: str | None = None,
        project: str | None = None,
        tags: Iterable[str] = (),
        schema: str | None = None,
        event_types: Iterable[str] | None = None,
        context_id: str | None = None,
    ) -> Context:
        """Store a new context at version 1 and return it.

        Args:
            owner: service that owns the context; the bus's service by default.
            schema: registered schema that every version must pass; taken
                from ``data``'s model when ``data`` is a registered model.
            event_types: event types that may update the context; None
                allows every type.
            context_id: an id of your choice; a new ULID by default.
        """
        context_id = check_name("context id", context_id or new_event_id())
        schema = self.schemas.name_of(data, schema)
        text = self._encode(context_id, schema, data)
        owner = owner or self.bus.settings.service
        types = sorted(event_types) if event_types is not None else None
        meta = {
            "id": context_id,
            "owner": owner,
            "project": project or "",
            "tags": json.dumps(list(tags)),
            "schema": schema or "",
            "event_types": json.dumps(types) if types is not None else "",
        }
        version = NewVersion(text, len(text.encode()), self.bus.settings.service)
        await self.bus.connect()
        created_ms = await self._store.create(
            self.bus.client, context_id, version, meta
        )
        if created_ms == 0:
            msg = (
                f"context {context_id!r} already exists; pick another id, or leave "
                "`context_id` out to get a generated one"
            )
            raise ContextError(msg)
        fields = {**meta, "created_ms": str(created_ms)}
        context = to_context(
            fields, {**_fields(version), "version": "1", **_ms(fields)}
        )
        self.metrics.count("created")
        self.metrics.size(context_id, context.size)
        logger.info(
            "context created context_id=%s owner=%s schema=%s",
            context_id,
            owner,
            schema,
        )
        await self._announce(context, "created")
        return context

    async def _meta(self, context_id: str) -> dict[str, str]:
        await self.bus.connect()
        fields = await self._store.current(
            self.bus.client, check_name("context id", context_id)
        )
        if fields is None:
            raise _not_found(context_id)
        return fields

    async def get(self, context_id: str, version: int | None = None) -> Context:
        """Return the current version of a context, or version ``version``."""
        meta = await self._meta(context_id)
        self.metrics.count("reads")
        current = int(meta["version"])
        if version is None or version == current:
            return to_context(meta, meta)
        if not 1 <= version <= current:
            msg = (
                f"context {context_id!r} has no version {version}: its versions "
                f"are 1 to {current}"
            )
            raise ContextNotFoundError(msg)
        [fields] = await self._store.versions(self.bus.client, context_id, [version])
        if fields is None:
            msg = (
                f"version {version} of context {context_id!r} is past its retention "
                f"of {self._store.retention_ms / 1000:.0f}s and was removed; "
                "`history` lists the versions still kept"
            )
            raise ContextNotFoundError(msg)
        return to_context(meta, fields)

    async def history(self, context_id: str, *, limit: int = 100) -> list[Context]:
        """Return the kept versions of a context, oldest first, at most ``limit``."""
        meta = await self._meta(context_id)
        self.metrics.count("reads")
        current = int(meta["version"])
        numbers = list(range(max(1, current - limit + 1), current + 1))
        stored = await self._store.versions(self.bus.client, context_id, numbers)
        stored[-1] = stored[-1] or meta
        return [to_context(meta, fields) for fields in stored if fields is not None]

    async def diff(
        self, context_id: str, from_version: int, to_version: int
    ) -> ContextDiff:
        """Return what changed between two versions of a context."""
        old, new = await asyncio.gather(
            self.get(context_id, from_version), self.get(context_id, to_version)
        )
        return diff_contexts(old, new)

    # -- update ----------------------------------------------------------

    async def update(
        self,
        context_id: str,
        data: ContextData,
        *,
        version: int,
        cause: Event[Any] | None = None,
    ) -> Context:
        """Replace the data of a context that is at ``version``; return the new version.

        Args:
            version: the version the new data was derived from.
            cause: the event that requested the change; its type must be one
                the context accepts, and its id is recorded.

        Raises:
            ContextConflictError: the context is no longer at ``version``.
            ContextValidationError: the data fails the context's schema or
                size limit, or ``cause``'s type may not update it.
        """
        meta = await self._meta(context_id)
        if cause is not None:
            self._check_type(meta, cause)
        text = self._encode(context_id, meta.get("schema") or None, data)
        new = NewVersion(
            text,
            len(text.encode()),
            self.bus.settings.service,
            cause.id if cause else "",
            cause.type if cause else "",
        )
        result = await self._store.update(self.bus.client, context_id, version, new)
        if result.status == -1:
            raise _not_found(context_id)
        if result.status == 0:
            self.metrics.count("conflicts")
            raise ContextConflictError(context_id, version, result.version)
        fields = {**_fields(new), "version": str(result.version)}
        context = to_context(meta, {**fields, "updated_ms": str(result.updated_ms)})
        self.metrics.count("updates")
        self.metrics.size(context_id, context.size)
        logger.debug(
            "context updated context_id=%s version=%d", context_id, context.version
        )
        await self._announce(context, "updated", cause)
        return context

    async def update_with_retry(
        self,
        context_id: str,
        change: Change,
        *,
        cause: Event[Any] | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> Context:
        """Apply ``change`` to the current version, re-reading after each conflict.

        ``change`` gets a copy of the current context, which it may modify,
        and returns the new data, or None to leave the context as it is.
        After ``attempts`` conflicts the last ``ContextConflictError`` is raised.
        """
        last: ContextConflictError | None = None
        for attempt in range(1, attempts + 1):
            current = await self.get(context_id)
            data = change(current.model_copy(deep=True))
            if inspect.isawaitable(data):
                data = await data
            if data is None:
                return current
            try:
                return await self.update(
                    context_id, data, version=current.version, cause=cause
                )
            except ContextConflictError as exc:
                last = exc
                logger.debug(
                    "context update conflict, retrying context_id=%s attempt=%d",
                    context_id,
                    attempt,
                )
                await asyncio.sleep(random.uniform(0, RETRY_PAUSE_CAP))
        assert last is not None
        raise last

    def _check_type(self, meta: dict[str, str], event: Event[Any]) -> None:
        allowed = meta.get("event_types")
        if not allowed or event.type in json.loads(allowed):
            return
        self.metrics.count("validation_failures")
        msg = (
            f"event type {event.type!r} may not update context {meta['id']!r}; "
            f"it accepts {json.loads(allowed)!r}: publish one of those types, or "
            "create the context with that type in `event_types`"
        )
        raise ContextValidationError(msg)

    # -- events that name a context ---------------------------------------

    def validated(
        self,
        *,
        cache: ContextCache | None = None,
        updates: bool = True,
        channel: str | None = None,
    ) -> Callable[[ContextHandler], GuardedHandler]:
        """Return a handler decorator that validates each event's context first.

        See ``hivebus.context.validation.validated`` for the arguments.
        """
        return validated(self, cache=cache, updates=updates, channel=channel)

    async def validate_event(
        self,
        event: Event[Any],
        *,
        cache: ContextCache | None = None,
        updates: bool = True,
    ) -> Context | None:
        """Return the context ``event`` names once the event passes validation."""
        return await load_context(self, event, cache=cache, updates=updates)

    # -- status and metrics ----------------------------------------------

    async def _announce(
        self,
        context: Context,
        status: StatusKind,
        cause: Event[Any] | None = None,
    ) -> None:
        """Publish a status event; a failure is logged, since the change is stored."""
        data = ContextStatus(
            context_id=context.id,
            status=status,
            version=context.version,
            service=self.bus.settings.service,
            owner=context.owner,
            project=context.project,
            size=context.size,
            event_id=cause.id if cause else None,
            event_type=cause.type if cause else None,
        )
        await self.publish_status(data)

    async def publish_status(self, status: ContextStatus) -> None:
        """Publish ``status`` on the contexts channel, logging instead of raising."""
        try:
            await self.bus.publish(CONTEXT_CHANNEL, status, type=STATUS_TYPE)
        except Exception:
            logger.exception(
                "context status not published context_id=%s status=%s",
                status.context_id,
                status.status,
            )

    async def read_metrics(self) -> dict[str, Any]:
        """Return the context metrics shared by every process on this Redis."""
        await self.bus.connect()
        return await self.metrics.read()

    async def close(self) -> None:
        """Write the metrics counted so far; call before stopping the bus."""
        await self.metrics.flush()


def _not_found(context_id: str) -> ContextNotFoundError:
    msg = (
        f"no context {context_id!r}: it was never created on this Redis and "
        "prefix; `ContextManager.create` returns the id to use"
    )
    return ContextNotFoundError(msg)


def _fields(version: NewVersion) -> dict[str, str]:
    values = version.fields()
    return {str(values[i]): str(values[i + 1]) for i in range(0, len(values), 2)}


def _ms(fields: dict[str, str]) -> dict[str, str]:
    return {"updated_ms": fields["created_ms"]}
