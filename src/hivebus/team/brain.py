"""The brain protocol: how an agent asks a model (or the offline stand-in) for work.

An ``Ask``'s prompt is plain text, best built with ``compose_prompt`` from
named sections (``## task``, ``## story`` and so on). Brains rely on the
sections: the offline brain reads its input from them, and the chat brain
trims whole sections, oldest first, when a prompt does not fit the model's
context window.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from pydantic import BaseModel

from hivebus.team.work import Role

ModelT = TypeVar("ModelT", bound=BaseModel)

CHARS_PER_TOKEN = 4
"""Characters per token in every estimate: a common rule of thumb for English."""

# Section names that the agents use and the offline brain reads.
TASK = "task"
PLAN = "plan"
STORY = "story"
DESIGN = "design"
IMPLEMENTATION = "implementation"
FINDINGS = "findings"
FEEDBACK = "feedback"
CONTEXT = "context"

_HEADING = re.compile(r"^## ([a-z][a-z0-9_]{0,39})$")
_ESCAPED_HEADING = re.compile(r"^\\+## [a-z][a-z0-9_]{0,39}$")


def estimate_tokens(text: str) -> int:
    """Return an estimate of the tokens in ``text``: characters / 4, rounded up."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call used; ``estimated`` when the server reported none."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        """Add two counts; the sum is an estimate if either part is."""
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            estimated=self.estimated or other.estimated,
        )


@dataclass(frozen=True, slots=True)
class Rejection:
    """A reply that did not fit the requested model, and why."""

    kind: str  # "json", "schema" or "truncated"
    detail: str


@dataclass(frozen=True, slots=True)
class Thought(Generic[ModelT]):
    """A brain's validated answer, with its cost and the replies it rejected.

    ``calls`` counts the model replies received, rejected ones included.
    ``notes`` records what the brain changed on the way, such as trimmed
    prompt sections or a request field the server did not support.
    """

    value: ModelT
    usage: Usage
    calls: int = 1
    rejections: tuple[Rejection, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Ask(Generic[ModelT]):
    """One request to a brain: the role's system prompt, the input, the output model.

    ``task_id`` and ``story_key`` say which piece of work the call belongs
    to, so that nothing of one task leaks into another's conversation.
    ``prompt`` is the user message; build it with ``compose_prompt``.
    """

    role: Role
    system: str
    prompt: str
    schema: type[ModelT]
    task_id: str
    story_key: str | None = None
    prompt_version: int | None = None


class Brain(Protocol):
    """Something that turns an ``Ask`` into a validated model instance."""

    name: str

    async def think(self, ask: Ask[ModelT]) -> Thought[ModelT]:
        """Answer ``ask`` with an instance of ``ask.schema``, or raise.

        Raises ``BrainError`` (or a subclass) when no fitting answer could be
        had within the brain's attempts and timeouts, and ``BreakerOpenError``
        when the brain's circuit breaker rejects the call.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


SectionValue = str | BaseModel | Iterable[BaseModel]


def compose_prompt(sections: Mapping[str, SectionValue | None]) -> str:
    """Join named sections into a prompt, in the mapping's order.

    Order the sections from the oldest or most general input (the task) to
    the newest (the current story, the latest findings): when a prompt is
    too long for the model, the chat brain keeps the first and last
    sections and trims the ones between. Models are rendered as compact
    JSON, lists of models as a JSON array, and ``None`` values are skipped.
    """
    rendered: list[tuple[str, str]] = []
    for name, value in sections.items():
        if value is None:
            continue
        if not _HEADING.match(f"## {name}"):
            msg = (
                f"invalid prompt section name {name!r}: use 1-40 lowercase letters, "
                "digits or '_', starting with a letter"
            )
            raise ValueError(msg)
        rendered.append((name, _render(value)))
    return join_sections(rendered)


def join_sections(sections: Iterable[tuple[str, str]]) -> str:
    """Join ``(name, body)`` pairs into a prompt; the inverse of ``split_prompt``.

    A section named ``""`` is written without a heading.
    """
    parts = [
        f"## {name}\n{_escape(body)}" if name else _escape(body)
        for name, body in sections
    ]
    return "\n\n".join(parts)


def split_prompt(prompt: str) -> list[tuple[str, str]]:
    """Return the ``(name, body)`` sections of a prompt made by ``compose_prompt``.

    Text before the first heading, or a prompt without headings, comes back
    as one section named ``""``.
    """
    sections: list[tuple[str, list[str]]] = []
    for line in prompt.split("\n"):
        heading = _HEADING.match(line)
        if heading:
            sections.append((heading.group(1), []))
            continue
        if not sections:
            sections.append(("", []))
        sections[-1][1].append(_unescape(line))
    return [(name, "\n".join(lines).strip("\n")) for name, lines in sections]


def prompt_sections(prompt: str) -> dict[str, str]:
    """Return the sections of a prompt by name; a repeated name keeps its last body."""
    return dict(split_prompt(prompt))


def _render(value: SectionValue) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    items = [item.model_dump(mode="json") for item in value]
    return json.dumps(items, ensure_ascii=False)


def _escape(body: str) -> str:
    """Put a backslash before body lines that would read as a heading."""
    lines = body.split("\n")
    return "\n".join(
        "\\" + line if _HEADING.match(line) or _ESCAPED_HEADING.match(line) else line
        for line in lines
    )


def _unescape(line: str) -> str:
    return line[1:] if _ESCAPED_HEADING.match(line) else line
