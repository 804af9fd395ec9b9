"""The project-wide context: one versioned context per project, one section per role.

The master initialises a project's context on its first task. The project
manager, developer, UX designer and tester then each update their own
section (planning, implementation, design, test_results). Every update goes through
the context manager's compare-and-set with retries, so concurrent tasks of
one project lose nothing. Each section contains one entry per task, keyed by
task id, and only the newest ``MAX_TASKS`` tasks are kept, so the context
stays small however many tasks a project runs.

Prompts get only ``digest``: counts, never another task's text, so that no
task's content leaks into another task's model calls.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from hivebus.bus import Bus
from hivebus.context.manager import ContextManager
from hivebus.context.models import Context
from hivebus.errors import ContextError, ContextNotFoundError
from hivebus.events import Event

logger = logging.getLogger(__name__)

Section = Literal["planning", "implementation", "design", "test_results"]
SECTIONS: tuple[Section, ...] = ("planning", "implementation", "design", "test_results")
MAX_TASKS = 20  # tasks whose entries each section keeps, newest first
MAX_TEXT = 300  # characters kept of any one text in an entry
UPDATE_ATTEMPTS = 100  # compare-and-set attempts; many tasks of a project may race


def context_id(project: str) -> str:
    """Return the id of a project's context."""
    return f"project.{project}"


class ProjectContexts:
    """Initialise, read and update project-wide contexts through the context manager."""

    def __init__(self, bus: Bus) -> None:
        self.manager = ContextManager(bus)

    async def ensure(self, project: str) -> Context:
        """Return the project's context, creating it with empty sections if needed."""
        cid = context_id(project)
        try:
            return await self.manager.get(cid)
        except ContextNotFoundError:
            pass
        empty: dict[str, Any] = {"project": project, "tasks": []}
        empty.update({section: {} for section in SECTIONS})
        try:
            created = await self.manager.create(
                empty, owner="master", project=project, tags=("team",), context_id=cid
            )
        except ContextError:
            return await self.manager.get(cid)  # another master created it first
        logger.info("project context created project=%s context_id=%s", project, cid)
        return created

    async def start_task(self, project: str, task_id: str, cause: Event[Any]) -> int:
        """Add a task to the project, dropping the oldest beyond ``MAX_TASKS``."""
        await self.ensure(project)

        def change(current: Context) -> dict[str, Any] | None:
            data = current.data
            tasks = [t for t in data.get("tasks", []) if t != task_id] + [task_id]
            if tasks == data.get("tasks"):
                return None
            kept = tasks[-MAX_TASKS:]
            data["tasks"] = kept
            for section in SECTIONS:
                entries = data.get(section, {})
                data[section] = {tid: v for tid, v in entries.items() if tid in kept}
            return data

        context = await self.manager.update_with_retry(
            context_id(project), change, cause=cause, attempts=UPDATE_ATTEMPTS
        )
        return context.version

    async def record(
        self,
        project: str,
        section: Section,
        task_id: str,
        item: str,
        value: dict[str, Any],
        cause: Event[Any],
    ) -> int:
        """Set ``item`` (a story key, or ``plan``) of a task in one section."""
        await self.ensure(project)
        clipped = {name: _clip(entry) for name, entry in value.items()}

        def change(current: Context) -> dict[str, Any] | None:
            data = current.data
            entries = data.setdefault(section, {}).setdefault(task_id, {})
            if entries.get(item) == clipped:
                return None
            entries[item] = clipped
            return data

        context = await self.manager.update_with_retry(
            context_id(project), change, cause=cause, attempts=UPDATE_ATTEMPTS
        )
        return context.version

    async def digest(self, project: str) -> str:
        """Return counts that describe the project, without any task's text."""
        data = (await self.ensure(project)).data
        tasks = len(data.get("tasks", []))
        stories = sum(len(v) for v in data.get("implementation", {}).values())
        failed = sum(
            1
            for entries in data.get("test_results", {}).values()
            for result in entries.values()
            if isinstance(result, dict) and result.get("passed") is False
        )
        return (
            f"project {project}: {tasks} recent task(s) including this one, "
            f"{stories} implemented story(ies), {failed} failed test round(s)"
        )

    async def close(self) -> None:
        """Write the context metrics counted so far."""
        await self.manager.close()


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[: MAX_TEXT - 3] + "..."
    if isinstance(value, list):
        return [_clip(item) for item in value[:20]]
    return value
