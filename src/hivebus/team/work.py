"""What each role produces: the structured output a brain must return.

Every model here is what a role asks its brain for (JSON that fits the
model). Field descriptions go into the JSON schema the brain receives.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Role = Literal["master", "pm", "developer", "ux", "tester"]
ROLES: tuple[Role, ...] = ("master", "pm", "developer", "ux", "tester")


class PlanStep(BaseModel):
    """One step of the master's breakdown of a task."""

    title: str = Field(min_length=1, max_length=200)
    goal: str = Field(min_length=1, max_length=2000)


class Plan(BaseModel):
    """The master's breakdown of a task, handed to the project manager."""

    summary: str = Field(min_length=1, max_length=4000)
    steps: list[PlanStep] = Field(min_length=1, max_length=20)


class Story(BaseModel):
    """A user story with acceptance criteria, written by the project manager."""

    key: str = Field(
        pattern=r"^S[0-9]{1,3}$", description="story key: S1, S2, ... in plan order"
    )
    title: str = Field(min_length=1, max_length=200)
    description: str = Field(min_length=1, max_length=4000)
    acceptance_criteria: list[str] = Field(min_length=1, max_length=12)
    needs_design: bool = Field(
        default=False, description="whether the UX designer should design it"
    )


class StoryList(BaseModel):
    """The project manager's stories for one plan."""

    stories: list[Story] = Field(min_length=1, max_length=20)


class Implementation(BaseModel):
    """The developer's implementation of one story."""

    story_key: str
    summary: str = Field(min_length=1, max_length=4000)
    files: list[str] = Field(default_factory=list, max_length=50)
    covered_criteria: list[str] = Field(
        default_factory=list, description="acceptance criteria this change satisfies"
    )


class Design(BaseModel):
    """The UX designer's design of one story."""

    story_key: str
    summary: str = Field(min_length=1, max_length=4000)
    screens: list[str] = Field(default_factory=list, max_length=20)


class Finding(BaseModel):
    """One problem the tester found."""

    criterion: str = Field(description="the acceptance criterion that is not met")
    detail: str = Field(min_length=1, max_length=2000)


class TestReport(BaseModel):
    """The tester's verdict on one implementation of a story."""

    __test__ = False  # not a pytest test class, despite the name

    story_key: str
    passed: bool
    findings: list[Finding] = Field(default_factory=list, max_length=50)
