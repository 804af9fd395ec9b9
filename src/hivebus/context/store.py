"""How contexts are laid out in Redis, and the atomic create and update steps.

A context is a hash ``P:ctx:{ID}`` that contains its current version and the
metadata fixed at creation. Every version, the current one included, is also
written to ``P:ctx:{ID}:v:N`` with a TTL (the retention), so that history and
diffs work for that long. Both keys share the hash tag ``{ID}``, so the Lua
scripts that write them together stay valid on Redis Cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hivebus.connection import Redis
from hivebus.context.models import Context
from hivebus.keys import Keys
from hivebus.scripts import source

# Fields of the context hash that are set at creation and never change.
META_FIELDS = (
    "id",
    "owner",
    "project",
    "tags",
    "schema",
    "event_types",
    "created_ms",
)


@dataclass(frozen=True, slots=True)
class NewVersion:
    """The fields of a version that the caller provides."""

    data: str
    size: int
    updated_by: str
    cause_id: str = ""
    cause_type: str = ""

    def fields(self) -> list[Any]:
        return [
            "data",
            self.data,
            "size",
            self.size,
            "updated_by",
            self.updated_by,
            "cause_id",
            self.cause_id,
            "cause_type",
            self.cause_type,
        ]


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """Outcome of a compare-and-set update."""

    status: int  # 1 written, 0 version mismatch, -1 no such context
    version: int  # the new version, or the current one on a mismatch
    updated_ms: int


class ContextStore:
    """Read and write contexts in Redis for one key prefix."""

    def __init__(self, keys: Keys, retention: float) -> None:
        self._keys = keys
        self.retention_ms = max(1, int(retention * 1000))
        self._scripts: dict[int, tuple[Any, Any]] = {}

    def _script(self, client: Redis, index: int) -> Any:
        """Return script ``index`` (0 create, 1 update) registered on ``client``."""
        scripts = self._scripts.get(id(client))
        if scripts is None:
            scripts = (
                client.register_script(source("context_create")),
                client.register_script(source("context_update")),
            )
            self._scripts = {id(client): scripts}
        return scripts[index]

    async def create(
        self, client: Redis, context_id: str, version: NewVersion, meta: dict[str, Any]
    ) -> int:
        """Write version 1; return its time in ms, or 0 if the id is taken."""
        version_fields = version.fields()
        meta_fields = [part for pair in meta.items() for part in pair]
        args = [self.retention_ms, len(version_fields) // 2]
        reply = await self._script(client, 0)(
            keys=[
                self._keys.context(context_id),
                self._keys.context_version(context_id, 1),
            ],
            args=[*args, *version_fields, *meta_fields],
        )
        return int(reply)

    async def update(
        self, client: Redis, context_id: str, expected: int, version: NewVersion
    ) -> UpdateResult:
        """Write version ``expected + 1`` if the context is at ``expected``."""
        reply = await self._script(client, 1)(
            keys=[
                self._keys.context(context_id),
                self._keys.context_version(context_id, expected + 1),
            ],
            args=[expected, self.retention_ms, *version.fields()],
        )
        status, current, updated_ms = (int(part) for part in reply)
        return UpdateResult(status, current, updated_ms)

    async def current(self, client: Redis, context_id: str) -> dict[str, str] | None:
        """Return the context hash, or None if there is no such context."""
        raw = await client.hgetall(self._keys.context(context_id))
        return _decode(raw) or None

    async def versions(
        self, client: Redis, context_id: str, numbers: list[int]
    ) -> list[dict[str, str] | None]:
        """Return the stored fields of each version, None where it expired."""
        pipe = client.pipeline(transaction=False)
        for number in numbers:
            pipe.hgetall(self._keys.context_version(context_id, number))
        return [_decode(raw) or None for raw in await pipe.execute()]


def to_context(meta: dict[str, str], version: dict[str, str]) -> Context:
    """Build a ``Context`` from the context hash and one version's fields."""
    event_types = meta.get("event_types", "")
    return Context(
        id=meta["id"],
        version=int(version["version"]),
        data=json.loads(version["data"]),
        owner=meta["owner"],
        project=meta.get("project") or None,
        tags=tuple(json.loads(meta.get("tags") or "[]")),
        schema_name=meta.get("schema") or None,
        event_types=tuple(json.loads(event_types)) if event_types else None,
        created_at=_time(meta["created_ms"]),
        updated_at=_time(version["updated_ms"]),
        updated_by=version.get("updated_by", ""),
        cause_id=version.get("cause_id") or None,
        cause_type=version.get("cause_type") or None,
        size=int(version.get("size", "0")),
    )


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _time(ms: str) -> datetime:
    return datetime.fromtimestamp(int(ms) / 1000, UTC)
