"""Differences between two versions of a context's data."""

from __future__ import annotations

from typing import Any

from hivebus.context.models import Context, ContextDiff, ValueChange


def diff_contexts(old: Context, new: Context) -> ContextDiff:
    """Return the keys added, removed and changed from ``old`` to ``new``."""
    result = ContextDiff(
        context_id=new.id, from_version=old.version, to_version=new.version
    )
    _compare(old.data, new.data, "", result)
    return result


def _compare(
    old: dict[str, Any], new: dict[str, Any], path: str, result: ContextDiff
) -> None:
    for key in sorted(old.keys() - new.keys()):
        result.removed[_pointer(path, key)] = old[key]
    for key in sorted(new.keys() - old.keys()):
        result.added[_pointer(path, key)] = new[key]
    for key in sorted(old.keys() & new.keys()):
        before, after = old[key], new[key]
        if before == after:
            continue
        pointer = _pointer(path, key)
        if isinstance(before, dict) and isinstance(after, dict):
            _compare(before, after, pointer, result)
        else:
            result.changed[pointer] = ValueChange(before=before, after=after)


def _pointer(path: str, key: str) -> str:
    """Append ``key`` to a JSON Pointer, escaping '~' and '/' (RFC 6901)."""
    return f"{path}/{key.replace('~', '~0').replace('/', '~1')}"
