"""A deterministic brain that needs no network: plausible work derived from the text.

The offline brain lets the whole team flow run, and be tested, with no model.
It reads the sections of the ask's prompt (see ``compose_prompt``) and
returns the same answer for the same ask, every time:

- master: a ``Plan`` with one step per clause of the task ("Add CSV export
  to the orders page: filter by date range, include totals" gives three).
- pm: a ``StoryList`` of 2-4 stories. The first story covers the task's
  main clause and has the other clauses as acceptance criteria; each
  further clause gets a story of its own. Stories whose title names a page,
  screen or other UI get ``needs_design``.
- developer: an ``Implementation``. Like a careless model, it leaves out
  the last acceptance criterion of a story with 3 or more criteria, unless
  its system prompt contains the guideline ``COVER_EVERY_CRITERION`` that
  the analyser writes after such a failure. It also covers every criterion
  named in a ``findings`` section, so a second round fixes the first.
- ux: a ``Design`` with screens for the story.
- tester: a ``TestReport`` that fails a story whose implementation does not
  list every acceptance criterion in ``covered_criteria``, with one finding
  per missing criterion.

Token usage is an estimate (characters / 4), marked ``estimated``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

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
    Thought,
    Usage,
    estimate_tokens,
    prompt_sections,
)
from hivebus.team.work import (
    Design,
    Finding,
    Implementation,
    Plan,
    PlanStep,
    Story,
    StoryList,
    TestReport,
)

MAX_CLAUSES = 12
MAX_STORIES = 4
CAREFUL_BELOW = 3  # stories with fewer criteria are always covered in full

_CLAUSE_BREAK = re.compile(r"[:;,\n]+|(?<=[.!?])\s+")
_UI_WORDS = re.compile(
    r"\b(pages?|screens?|ui|ux|forms?|buttons?|dialogs?|modals?|dashboards?|views?|"
    r"layouts?|menus?|widgets?|frontend|front-end|web|themes?|icons?)\b",
    re.IGNORECASE,
)
_FILLER_CRITERIA = (
    "{main} works end to end",
    "invalid input is rejected with a clear message",
    "automated tests cover the change",
)
_FINDINGS = TypeAdapter(list[Finding])

Sections = dict[str, str]


class OfflineBrain:
    """A brain that derives structured work from the ask's text, with no model."""

    name = "offline"

    def __init__(self) -> None:
        self._makers: dict[type[BaseModel], Callable[[Ask[Any], Sections], Any]] = {
            Plan: _plan,
            StoryList: _stories,
            Implementation: _implementation,
            Design: _design,
            TestReport: _test_report,
        }

    async def think(self, ask: Ask[ModelT]) -> Thought[ModelT]:
        """Return the offline output for ``ask``; the same ask gets the same output."""
        maker = self._maker_for(ask.schema)
        sections = prompt_sections(ask.prompt)
        produced: BaseModel = maker(ask, sections)
        value = ask.schema.model_validate(produced.model_dump())
        reply = value.model_dump_json()
        usage = Usage(
            prompt_tokens=estimate_tokens(ask.system) + estimate_tokens(ask.prompt),
            completion_tokens=estimate_tokens(reply),
            estimated=True,
        )
        return Thought(value=value, usage=usage, calls=1)

    async def aclose(self) -> None:
        """Release nothing: the offline brain holds no connections."""

    def _maker_for(
        self, schema: type[BaseModel]
    ) -> Callable[[Ask[Any], Sections], Any]:
        for model, maker in self._makers.items():
            if issubclass(schema, model):
                return maker
        known = ", ".join(model.__name__ for model in self._makers)
        msg = (
            f"the offline brain cannot produce {schema.__name__!r}; it knows {known}. "
            "Set HIVEBUS_BRAIN_URL to use a model for other outputs"
        )
        raise BrainReplyError(msg)


# -- master and project manager ------------------------------------------


def _plan(ask: Ask[Any], sections: Sections) -> Plan:
    task = _task_text(ask, sections)
    main, *details = _clauses(task)
    steps = [PlanStep(title=_cap(main), goal=f"{_sentence(main)} works end to end.")]
    for detail in details:
        steps.append(
            PlanStep(
                title=_cap(detail), goal=f"{_sentence(detail)}, as part of: {main}."
            )
        )
    feedback = sections.get(FEEDBACK, "").strip()
    if feedback:
        steps.append(
            PlanStep(title="Address the review comment", goal=_clip(feedback, 2000))
        )
    return Plan(summary=_clip(f"Plan for: {task}", 4000), steps=steps[:20])


def _stories(ask: Ask[Any], sections: Sections) -> StoryList:
    return StoryList(stories=_derive_stories(_story_clauses(ask, sections)))


def _story_clauses(ask: Ask[Any], sections: Sections) -> list[str]:
    plan = _parse(Plan, sections.get(PLAN))
    if plan is not None:
        return [step.title for step in plan.steps][:MAX_CLAUSES]
    return _clauses(_task_text(ask, sections))


def _derive_stories(clauses: list[str]) -> list[Story]:
    main, *details = clauses
    criteria = list(details[: MAX_CLAUSES - 1])
    for filler in _FILLER_CRITERIA:
        if len(criteria) >= CAREFUL_BELOW:
            break
        criteria.append(filler.format(main=_sentence(main)))
    stories = [_story(1, main, _sentence(main) + ".", criteria)]
    for detail in details[: MAX_STORIES - 1]:
        number = len(stories) + 1
        description = f"{_sentence(detail)}, as part of: {main}."
        checks = [detail, f"a test shows that {_lower_first(detail)} works"]
        stories.append(_story(number, detail, description, checks))
    if len(stories) == 1:
        checks = [f"the user guide explains: {main}", "the changelog lists the change"]
        stories.append(_story(2, f"Document: {main}", f"Document: {main}.", checks))
    return stories


def _story(number: int, title: str, description: str, criteria: list[str]) -> Story:
    return Story(
        key=f"S{number}",
        title=_clip(_cap(title), 200),
        description=_clip(description, 4000),
        acceptance_criteria=[_clip(text, 300) for text in criteria],
        needs_design=bool(_UI_WORDS.search(title)),
    )


# -- developer, UX designer, tester --------------------------------------


def _implementation(ask: Ask[Any], sections: Sections) -> Implementation:
    story = _current_story(ask, sections)
    criteria = story.acceptance_criteria
    careful = COVER_EVERY_CRITERION.casefold() in ask.system.casefold()
    if careful or len(criteria) < CAREFUL_BELOW:
        covered = list(criteria)
    else:
        covered = criteria[:-1]
    reported = {_norm(finding.criterion) for finding in _findings(sections)}
    fixed = [text for text in criteria if _norm(text) in reported]
    covered = [text for text in criteria if text in covered or text in fixed]
    summary = (
        f"Implemented {story.title}: covers {len(covered)} of {len(criteria)} "
        "acceptance criteria."
    )
    if fixed:
        summary += " Addressed the tester's findings: " + "; ".join(fixed) + "."
    return Implementation(
        story_key=story.key,
        summary=_clip(summary, 4000),
        files=_files(story),
        covered_criteria=covered,
    )


def _design(ask: Ask[Any], sections: Sections) -> Design:
    story = _current_story(ask, sections)
    title = _clip(story.title, 150)
    screens = [f"{title}: default", f"{title}: empty", f"{title}: error"]
    summary = (
        f"Design for {story.title}: one screen in three states, with the controls "
        "for each acceptance criterion in reading order and keyboard reachable."
    )
    return Design(story_key=story.key, summary=_clip(summary, 4000), screens=screens)


def _test_report(ask: Ask[Any], sections: Sections) -> TestReport:
    story = _current_story(ask, sections)
    implementation = _parse(Implementation, sections.get(IMPLEMENTATION))
    covered = set()
    if implementation is not None:
        covered = {_norm(text) for text in implementation.covered_criteria}
    findings = [
        Finding(
            criterion=text,
            detail=_clip(
                f"the implementation of {story.key} does not cover the acceptance "
                f"criterion: {text}",
                2000,
            ),
        )
        for text in story.acceptance_criteria
        if _norm(text) not in covered
    ]
    return TestReport(story_key=story.key, passed=not findings, findings=findings)


def _current_story(ask: Ask[Any], sections: Sections) -> Story:
    story = _parse(Story, sections.get(STORY))
    if story is not None:
        return story
    stories = _derive_stories(_clauses(_task_text(ask, sections)))
    for candidate in stories:
        if candidate.key == ask.story_key:
            return candidate
    return stories[0]


def _findings(sections: Sections) -> list[Finding]:
    text = sections.get(FINDINGS)
    if not text:
        return []
    try:
        return _FINDINGS.validate_json(text)
    except ValidationError:
        return []


def _files(story: Story) -> list[str]:
    slug = (
        re.sub(r"[^a-z0-9]+", "_", story.title.casefold()).strip("_")[:40] or "change"
    )
    files = [f"src/{slug}.py", f"tests/test_{slug}.py"]
    if story.needs_design:
        files.append(f"templates/{slug}.html")
    return files


# -- text helpers --------------------------------------------------------


def _task_text(ask: Ask[Any], sections: Sections) -> str:
    text = sections.get(TASK) or sections.get("") or ask.prompt
    return text.strip() or "Untitled task"


def _clauses(text: str) -> list[str]:
    """Split a task into its clauses, in order, without repeats; never empty."""
    seen: set[str] = set()
    clauses: list[str] = []
    for part in _CLAUSE_BREAK.split(text):
        clause = part.strip(" \t.!?-*\"'")
        if len(clause) < 3 or _norm(clause) in seen:
            continue
        seen.add(_norm(clause))
        clauses.append(_clip(clause, 300))
    return clauses[:MAX_CLAUSES] or [_clip(text.strip() or "Untitled task", 300)]


def _parse(model: type[ModelT], text: str | None) -> ModelT | None:
    if not text:
        return None
    try:
        return model.model_validate_json(text)
    except ValidationError:
        return None


def _norm(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _sentence(text: str) -> str:
    return _cap(text.rstrip(" ."))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
