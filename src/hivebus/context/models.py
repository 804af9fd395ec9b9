"""Models of the context manager: a context version, a diff, a status event."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CONTEXT_CHANNEL = "hivebus.contexts"
STATUS_TYPE = "hivebus.context.status"

StatusKind = Literal["created", "updated", "rejected"]


class Context(BaseModel):
    """One version of a context: its data, and the metadata set at creation.

    Treat ``data`` as read-only: a cache may hand the same object to several
    handlers. ``ContextManager.update_with_retry`` passes its function a copy
    that may be changed in place.

    Attributes:
        schema_name: name of the pydantic model that every version's data
            must pass, or None for any JSON object.
        event_types: event types that may update the context; None allows
            every type.
        cause_id: id of the event that made this version, if one did.
        size: length in bytes of ``data`` encoded as JSON.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    version: int = Field(ge=1)
    data: dict[str, Any]
    owner: str
    project: str | None = None
    tags: tuple[str, ...] = ()
    schema_name: str | None = None
    event_types: tuple[str, ...] | None = None
    created_at: datetime
    updated_at: datetime
    updated_by: str
    cause_id: str | None = None
    cause_type: str | None = None
    size: int = Field(ge=0)


class ValueChange(BaseModel):
    """A value that differs between two versions."""

    before: Any
    after: Any


class ContextDiff(BaseModel):
    """The changes from one version of a context to another.

    Keys are JSON Pointers (RFC 6901) into ``data``, such as ``/plan/steps``.
    Nested objects are compared key by key; lists and other values as a whole.
    """

    context_id: str
    from_version: int
    to_version: int
    added: dict[str, Any] = Field(default_factory=dict)
    removed: dict[str, Any] = Field(default_factory=dict)
    changed: dict[str, ValueChange] = Field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Whether the two versions hold the same data."""
        return not (self.added or self.removed or self.changed)


class ContextStatus(BaseModel):
    """Payload of a status event on the ``hivebus.contexts`` broadcast channel.

    Attributes:
        version: the version created or updated to; for ``rejected``, the
            version the rejected event named (0 if it named none).
        event_id: the event that caused the change or was rejected.
    """

    context_id: str
    status: StatusKind
    version: int = Field(ge=0)
    service: str
    owner: str | None = None
    project: str | None = None
    size: int | None = None
    reason: str | None = None
    event_id: str | None = None
    event_type: str | None = None
