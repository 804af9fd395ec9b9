"""A task's events as a tree: each event under the event that caused it.

Every team event is recorded with the task as a small summary (id, type,
source, channel, subject, correlation and causation ids, time and one line
of its data), so the tree outlives the 24-hour event store.
"""

from __future__ import annotations

from typing import Any

from hivebus.events import Event

EVENT_SUMMARY_CHARS = 200  # characters of a payload kept in the event tree


def summarize(event: Event[Any], channel: str) -> dict[str, Any]:
    """Return the tree node of an event: ids, type, links and a short summary."""
    data = event.model_dump(mode="json")["data"]
    return {
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "channel": channel,
        "subject": event.subject,
        "correlationid": event.correlationid,
        "causationid": event.causationid,
        "time": event.time.isoformat(),
        "summary": describe(event.type, data),
    }


def describe(event_type: str, data: Any) -> str:
    """Return a one-line description of an event's data."""
    if not isinstance(data, dict):
        return str(data)[:EVENT_SUMMARY_CHARS]
    parts = []
    for name in ("role", "story_key", "round", "state", "status", "plan_version"):
        if data.get(name) is not None:
            parts.append(f"{name}={data[name]}")
    story = data.get("story")
    if isinstance(story, dict):
        parts.append(f"story={story.get('key')}")
    report = data.get("report")
    if isinstance(report, dict):
        parts.append(f"passed={report.get('passed')}")
    text = data.get("reason") or data.get("message") or data.get("comment")
    if text:
        parts.append(str(text))
    return " ".join(parts)[:EVENT_SUMMARY_CHARS] or event_type


def event_tree(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Nest event summaries under their causes; events with no known cause are roots."""
    nodes = {event["id"]: {**event, "children": []} for event in events}
    roots = []
    for event in events:
        node = nodes[event["id"]]
        parent = nodes.get(event.get("causationid") or "")
        if parent is None or parent is node:
            roots.append(node)
        else:
            parent["children"].append(node)
    return roots


def tree_lines(tree: list[dict[str, Any]], depth: int = 0) -> list[str]:
    """Return the event tree as indented text lines."""
    lines = []
    for node in tree:
        summary = f" {node['summary']}" if node.get("summary") else ""
        lines.append(f"{'  ' * depth}- {node['type']} {node['id']}{summary}")
        lines.extend(tree_lines(node["children"], depth + 1))
    return lines
