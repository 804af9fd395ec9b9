"""The offline brain: deterministic work from the task text, failing then passing."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from hivebus.errors import BrainReplyError
from hivebus.team.analyser import COVER_EVERY_CRITERION
from hivebus.team.brain import (
    FEEDBACK,
    FINDINGS,
    IMPLEMENTATION,
    PLAN,
    STORY,
    TASK,
    Ask,
    ModelT,
    compose_prompt,
    estimate_tokens,
)
from hivebus.team.offline import OfflineBrain
from hivebus.team.prompts import DEFAULT_PROMPTS
from hivebus.team.work import (
    Design,
    Finding,
    Implementation,
    Plan,
    PlanStep,
    Role,
    Story,
    StoryList,
    TestReport,
)

TASK_TEXT = (
    "Add CSV export to the orders page: filter by date range, include totals, "
    "record who exported"
)
CLAUSES = ["filter by date range", "include totals", "record who exported"]


def ask(
    role: Role, schema: type[ModelT], sections: dict[str, Any], system: str = ""
) -> Ask[ModelT]:
    return Ask(
        role=role,
        system=system or DEFAULT_PROMPTS[role],
        prompt=compose_prompt(sections),
        schema=schema,
        task_id="t-1",
    )


async def stories(task: str = TASK_TEXT) -> list[Story]:
    thought = await OfflineBrain().think(ask("pm", StoryList, {TASK: task}))
    return thought.value.stories


async def implement(story: Story, **extra: Any) -> Implementation:
    system = extra.pop("system", "")
    sections = {TASK: TASK_TEXT, STORY: story, **extra}
    thought = await OfflineBrain().think(
        ask("developer", Implementation, sections, system)
    )
    return thought.value


async def verdict(story: Story, implementation: Implementation) -> TestReport:
    sections = {TASK: TASK_TEXT, STORY: story, IMPLEMENTATION: implementation}
    thought = await OfflineBrain().think(ask("tester", TestReport, sections))
    return thought.value


async def test_same_ask_same_answer() -> None:
    brain = OfflineBrain()
    first = await brain.think(ask("pm", StoryList, {TASK: TASK_TEXT}))
    second = await brain.think(ask("pm", StoryList, {TASK: TASK_TEXT}))

    assert first.value == second.value
    assert first.usage == second.usage


async def test_plan_step_per_clause() -> None:
    thought = await OfflineBrain().think(ask("master", Plan, {TASK: TASK_TEXT}))

    titles = [step.title for step in thought.value.steps]
    assert titles == [
        "Add CSV export to the orders page",
        "Filter by date range",
        "Include totals",
        "Record who exported",
    ]
    assert TASK_TEXT in thought.value.summary


async def test_plan_adds_review_comment() -> None:
    sections = {TASK: TASK_TEXT, FEEDBACK: "split story 2 into two stories"}
    thought = await OfflineBrain().think(ask("master", Plan, sections))

    assert thought.value.steps[-1].goal == "split story 2 into two stories"
    assert len(thought.value.steps) == 5


async def test_stories_derived_from_task() -> None:
    result = await stories()

    assert [s.key for s in result] == ["S1", "S2", "S3", "S4"]
    assert result[0].acceptance_criteria == CLAUSES
    assert result[0].needs_design is True
    assert [s.needs_design for s in result[1:]] == [False, False, False]
    assert result[1].acceptance_criteria[0] == "filter by date range"


async def test_stories_follow_plan_steps() -> None:
    plan = Plan(
        summary="s",
        steps=[
            PlanStep(title="Build the report screen", goal="g"),
            PlanStep(title="Email the report", goal="g"),
        ],
    )
    thought = await OfflineBrain().think(
        ask("pm", StoryList, {TASK: "anything", PLAN: plan})
    )

    titles = [s.title for s in thought.value.stories]
    assert titles == ["Build the report screen", "Email the report"]
    assert thought.value.stories[0].needs_design is True


async def test_short_task_two_stories() -> None:
    result = await stories("Add a logout link")

    assert len(result) == 2
    assert len(result[0].acceptance_criteria) == 3
    assert result[1].title.startswith("Document")


async def test_developer_leaves_out_last_criterion() -> None:
    first = (await stories())[0]

    work = await implement(first)

    assert work.story_key == "S1"
    assert work.covered_criteria == CLAUSES[:2]
    assert "templates/" in work.files[-1]


async def test_developer_with_guideline_covers_all() -> None:
    first = (await stories())[0]
    system = f"{DEFAULT_PROMPTS['developer']}\n\n- {COVER_EVERY_CRITERION}."

    work = await implement(first, system=system)

    assert work.covered_criteria == CLAUSES


async def test_small_story_fully_covered() -> None:
    second = (await stories())[1]

    work = await implement(second)

    assert work.covered_criteria == second.acceptance_criteria


async def test_tester_fails_missing_criterion() -> None:
    first = (await stories())[0]
    work = await implement(first)

    report = await verdict(first, work)

    assert report.passed is False
    assert [f.criterion for f in report.findings] == ["record who exported"]
    assert report.story_key == "S1"


async def test_second_round_fixes_findings() -> None:
    first = (await stories())[0]
    report = await verdict(first, await implement(first))

    again = await implement(first, **{FINDINGS: report.findings})
    second = await verdict(first, again)

    assert again.covered_criteria == CLAUSES
    assert "record who exported" in again.summary
    assert second.passed is True
    assert second.findings == []


async def test_tester_without_implementation_fails_all() -> None:
    first = (await stories())[0]
    thought = await OfflineBrain().think(
        ask("tester", TestReport, {TASK: TASK_TEXT, STORY: first})
    )

    assert [f.criterion for f in thought.value.findings] == CLAUSES


async def test_designer_names_screens() -> None:
    first = (await stories())[0]
    thought = await OfflineBrain().think(
        ask("ux", Design, {TASK: TASK_TEXT, STORY: first})
    )

    assert thought.value.story_key == "S1"
    assert len(thought.value.screens) == 3


async def test_usage_is_marked_estimate() -> None:
    request = ask("pm", StoryList, {TASK: TASK_TEXT})
    thought = await OfflineBrain().think(request)

    expected = estimate_tokens(request.system) + estimate_tokens(request.prompt)
    assert thought.usage.estimated is True
    assert thought.usage.prompt_tokens == expected
    assert thought.usage.completion_tokens == estimate_tokens(
        thought.value.model_dump_json()
    )
    assert thought.calls == 1


async def test_unknown_schema_raises() -> None:
    class Poem(BaseModel):
        lines: list[str]

    with pytest.raises(BrainReplyError, match="'Poem'"):
        await OfflineBrain().think(ask("master", Poem, {TASK: TASK_TEXT}))


async def test_findings_survive_prompt_round_trip() -> None:
    finding = Finding(criterion="include totals", detail="## not a heading")
    first = (await stories())[0]

    work = await implement(first, **{FINDINGS: [finding]})

    assert "include totals" in work.covered_criteria
