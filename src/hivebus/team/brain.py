"""The brain protocol: how an agent asks a model (or the offline stand-in) for work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from pydantic import BaseModel

from hivebus.team.work import Role

ModelT = TypeVar("ModelT", bound=BaseModel)


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


@dataclass(frozen=True, slots=True)
class Rejection:
    """A reply that did not fit the requested model, and why."""

    kind: str  # "json", "schema" or "truncated"
    detail: str


@dataclass(frozen=True, slots=True)
class Thought(Generic[ModelT]):
    """A brain's validated answer, with its cost and the replies it rejected."""

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
        had within the brain's attempts, timeouts and breaker.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
