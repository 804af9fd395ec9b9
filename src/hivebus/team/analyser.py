"""Learning from a finished task: turn its outcome into better role prompts.

An ``Analyser`` reads a task's ``Outcome`` and the roles' current prompts.
The outcome contains the test verdicts per story and round, dead letters,
retries, rejected replies and durations. The analyser returns
``PromptChange``s, each with the full new text of a role's prompt, the
reason and the ids of the events that triggered it. ``improve_prompts``
runs an analyser and stores its changes as new prompt versions.

Learned guidelines live in one block at the end of a prompt::

    <the role's own instructions>

    Guidelines learned from earlier tasks:
    - Cover every acceptance criterion explicitly ...
    - Reply with the JSON object only ...

Both analysers keep that block free of duplicates (compared without case,
spacing or a final period), at most ``MAX_GUIDELINES`` lines long, and the
whole prompt under ``MAX_PROMPT_CHARS``: the oldest guideline goes first.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, Field

from hivebus.errors import BrainError, BreakerOpenError
from hivebus.team.brain import Ask, Brain, Rejection, compose_prompt
from hivebus.team.prompts import MAX_PROMPT_CHARS, PromptStore, PromptVersion
from hivebus.team.work import ROLES, Finding, Role

logger = logging.getLogger(__name__)

COVER_EVERY_CRITERION = "Cover every acceptance criterion explicitly"
"""The start of the developer guideline that the rule analyser writes after a
test finding. The offline developer covers every criterion when its system
prompt contains this text."""

GUIDELINES_HEADER = "Guidelines learned from earlier tasks:"
MAX_GUIDELINES = 8
MAX_EXAMPLES = 3  # missed criteria quoted in the coverage guideline
MAX_EXAMPLE_CHARS = 80
MAX_GUIDELINE_CHARS = 400
MAX_IMPROVE_ATTEMPTS = 3  # re-analyses when another process changed a prompt first

_REJECTION_GUIDELINES = {
    "json": (
        "Reply with the JSON object only: no prose before or after it, no "
        "comments and no Markdown fence."
    ),
    "schema": (
        "Before replying, check that every required field of the JSON schema is "
        "present and has the right type."
    ),
    "truncated": (
        "Keep the reply short enough to finish: summaries under 100 words and no "
        "repeated text."
    ),
}
_EXAMPLES = re.compile(r'"([^"]*)"')


@dataclass(frozen=True, slots=True)
class RoundVerdict:
    """The tester's verdict on one story in one round (1 is the first)."""

    story_key: str
    round: int
    passed: bool
    findings: tuple[Finding, ...] = ()
    event_id: str = ""


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """An event of the task that went to the dead-letter queue."""

    event_id: str
    event_type: str
    reason: str
    role: Role | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The record of one finished task, as input to an analyser.

    ``retries`` counts handler retries per role, ``durations`` the seconds
    each role worked, and ``rejections`` the model replies each role's brain
    rejected.
    """

    task_id: str
    status: str = "completed"
    rounds: tuple[RoundVerdict, ...] = ()
    dead_letters: tuple[DeadLettered, ...] = ()
    retries: Mapping[Role, int] = field(default_factory=dict)
    durations: Mapping[Role, float] = field(default_factory=dict)
    rejections: Mapping[Role, tuple[Rejection, ...]] = field(default_factory=dict)

    def event_ids(self) -> tuple[str, ...]:
        """Return the ids of the failed test results and dead letters, in order."""
        failed = [r.event_id for r in self.rounds if not r.passed and r.event_id]
        dead = [d.event_id for d in self.dead_letters if d.event_id]
        return tuple(dict.fromkeys(failed + dead))


@dataclass(frozen=True, slots=True)
class PromptChange:
    """A proposed new prompt for a role: its full text, the reason and triggers."""

    role: Role
    text: str
    reason: str
    triggers: tuple[str, ...] = ()


class Analyser(Protocol):
    """Something that turns a task's outcome into prompt changes."""

    async def analyse(
        self, outcome: Outcome, prompts: Mapping[Role, str]
    ) -> list[PromptChange]:
        """Return the changes for ``outcome``, given each role's current prompt text.

        A role missing from ``prompts`` gets no change.
        """
        ...


# -- the rule analyser ----------------------------------------------------


class RuleAnalyser:
    """The default analyser: fixed rules, no model, the same output for the same input.

    - Test findings give the developer the guideline ``COVER_EVERY_CRITERION``,
      quoting up to ``MAX_EXAMPLES`` of the most recently missed criteria.
    - Rejected model replies give the role a guideline for each kind of
      rejection (not JSON, wrong schema, cut off).
    - Dead letters, retries and durations change no prompt: they point at
      infrastructure, not at instructions.
    """

    async def analyse(
        self, outcome: Outcome, prompts: Mapping[Role, str]
    ) -> list[PromptChange]:
        """Return at most one change per role; none when nothing new was learned."""
        changes: list[PromptChange] = []
        developer = self._coverage_change(outcome, prompts.get("developer"))
        if developer is not None:
            changes.append(developer)
        for role, rejections in outcome.rejections.items():
            change = self._rejection_change(
                outcome, role, rejections, prompts.get(role)
            )
            if change is not None:
                changes.append(change)
        return changes

    def _coverage_change(
        self, outcome: Outcome, prompt: str | None
    ) -> PromptChange | None:
        failed = [r for r in outcome.rounds if not r.passed and r.findings]
        missed = _unique(_example(f.criterion) for r in failed for f in r.findings)
        if prompt is None or not missed:
            return None
        base, guidelines = split_guidelines(prompt)
        index = _find(guidelines, COVER_EVERY_CRITERION)
        known = _EXAMPLES.findall(guidelines[index]) if index is not None else []
        examples = _unique([*known, *missed])[-MAX_EXAMPLES:]
        guideline = coverage_guideline(examples)
        if index is None:
            guidelines.append(guideline)
        else:
            guidelines[index] = guideline
        text = fit_guidelines(base, guidelines, keep=guideline)
        if text is None or text == prompt:
            return None
        quoted = "; ".join(
            f'{r.story_key} round {r.round}: "{f.criterion}"'
            for r in failed
            for f in r.findings
        )
        reason = (
            f"the tester reported unmet acceptance criteria in task {outcome.task_id}: "
            f"{quoted}"
        )
        triggers = tuple(dict.fromkeys(r.event_id for r in failed if r.event_id))
        return PromptChange(
            "developer", text, _clip(reason, 1000), triggers or (outcome.task_id,)
        )

    def _rejection_change(
        self,
        outcome: Outcome,
        role: Role,
        rejections: tuple[Rejection, ...],
        prompt: str | None,
    ) -> PromptChange | None:
        kinds = _unique(r.kind for r in rejections if r.kind in _REJECTION_GUIDELINES)
        if prompt is None or not kinds:
            return None
        added = [_REJECTION_GUIDELINES[kind] for kind in kinds]
        text = merge_guidelines(prompt, added)
        if text is None or text == prompt:
            return None
        counts = ", ".join(
            f"{sum(r.kind == kind for r in rejections)} {kind}" for kind in kinds
        )
        reason = (
            f"{role} replies were rejected in task {outcome.task_id} ({counts}); "
            f"first: {rejections[0].detail}"
        )
        return PromptChange(role, text, _clip(reason, 1000), (outcome.task_id,))


def coverage_guideline(examples: Iterable[str]) -> str:
    """Return the developer's coverage guideline, quoting missed criteria."""
    quoted = "; ".join(f'"{_example(text)}"' for text in examples)
    guideline = (
        f"{COVER_EVERY_CRITERION} and list each one, word for word, in "
        "covered_criteria."
    )
    if quoted:
        guideline += f" Criteria missed before: {quoted}."
    return guideline


# -- the model-backed analyser ------------------------------------------


ANALYST_PROMPT = (
    "You are the prompt analyst of a software team. You get the outcome of a "
    "finished task (test findings per story and round, dead-lettered events, "
    "retries, rejected model replies, time per role) and each role's current "
    "system prompt. Propose at most five short, general guidelines that would "
    "have prevented the problems, each for one role (master, pm, developer, ux "
    "or tester), with the reason. Do not repeat a guideline the prompt already "
    "has, and propose nothing when the task went well."
)


class Advice(BaseModel):
    """One guideline that the analyst model proposes for a role."""

    role: Role
    guideline: str = Field(min_length=5, max_length=MAX_GUIDELINE_CHARS)
    reason: str = Field(min_length=1, max_length=1000)


class AdviceList(BaseModel):
    """The analyst model's reply: guidelines to add, possibly none."""

    advice: list[Advice] = Field(default_factory=list, max_length=5)


class LLMAnalyser:
    """An analyser that gets guidelines from a brain and merges them like the rules.

    When the brain fails (or its breaker is open) it logs a warning and
    returns ``fallback``'s changes, the rule analyser's by default.
    """

    def __init__(self, brain: Brain, *, fallback: Analyser | None = None) -> None:
        self.brain = brain
        self.fallback = fallback if fallback is not None else RuleAnalyser()

    async def analyse(
        self, outcome: Outcome, prompts: Mapping[Role, str]
    ) -> list[PromptChange]:
        """Return the brain's guidelines as at most one change per role."""
        ask = Ask(
            role="master",
            system=ANALYST_PROMPT,
            prompt=compose_prompt(
                {
                    "outcome": json.dumps(outcome_summary(outcome)),
                    "prompts": json.dumps(dict(prompts)),
                }
            ),
            schema=AdviceList,
            task_id=outcome.task_id,
        )
        try:
            thought = await self.brain.think(ask)
        except (BrainError, BreakerOpenError) as exc:
            logger.warning(
                "prompt analysis by brain failed, using fallback task=%s brain=%s "
                "error=%s",
                outcome.task_id,
                self.brain.name,
                exc,
            )
            return await self.fallback.analyse(outcome, prompts)
        return _changes_from_advice(outcome, thought.value.advice, prompts)


def _changes_from_advice(
    outcome: Outcome, advice: list[Advice], prompts: Mapping[Role, str]
) -> list[PromptChange]:
    changes: list[PromptChange] = []
    triggers = outcome.event_ids() or (outcome.task_id,)
    for role in ROLES:
        mine = [item for item in advice if item.role == role]
        prompt = prompts.get(role)
        if not mine or prompt is None:
            continue
        text = merge_guidelines(prompt, [item.guideline for item in mine])
        if text is None or text == prompt:
            continue
        reason = "; ".join(_unique(item.reason for item in mine))
        changes.append(PromptChange(role, text, _clip(reason, 1000), triggers))
    return changes


def outcome_summary(outcome: Outcome) -> dict[str, Any]:
    """Return ``outcome`` as plain JSON-ready data, for a model or a log."""
    return {
        "task_id": outcome.task_id,
        "status": outcome.status,
        "rounds": [
            {
                "story": r.story_key,
                "round": r.round,
                "passed": r.passed,
                "findings": [f.model_dump() for f in r.findings],
            }
            for r in outcome.rounds
        ],
        "dead_letters": [asdict(d) for d in outcome.dead_letters],
        "retries": dict(outcome.retries),
        "durations_s": {role: round(s, 1) for role, s in outcome.durations.items()},
        "rejections": {
            role: [asdict(r) for r in items]
            for role, items in outcome.rejections.items()
        },
    }


# -- storing the changes ------------------------------------------------


async def improve_prompts(
    store: PromptStore, analyser: Analyser, outcome: Outcome
) -> list[PromptVersion]:
    """Analyse ``outcome`` against the latest prompts and store the changes.

    A change is computed from each role's latest version (not a pinned one)
    and stored only while that version is still the latest. When another
    process stored a version first, the analysis runs again on the new text,
    up to ``MAX_IMPROVE_ATTEMPTS`` times, so no learned guideline is lost.
    """
    stored: list[PromptVersion] = []
    pending: set[Role] = set(ROLES)
    for _ in range(MAX_IMPROVE_ATTEMPTS):
        latest = {
            role: await store.get(role, await store.latest_version(role))
            for role in pending
        }
        changes = await analyser.analyse(
            outcome, {role: version.text for role, version in latest.items()}
        )
        conflicted: set[Role] = set()
        for change in changes:
            if change.role not in pending:
                continue
            created = await store.propose_if_latest(
                change.role,
                latest[change.role].version,
                change.text,
                reason=change.reason,
                triggers=change.triggers,
            )
            if created is None:
                conflicted.add(change.role)
            else:
                stored.append(created)
        if not conflicted:
            return stored
        pending = conflicted
    logger.warning(
        "prompt changes dropped after repeated conflicts task=%s roles=%s",
        outcome.task_id,
        ",".join(sorted(pending)),
    )
    return stored


# -- the guideline block ------------------------------------------------


def split_guidelines(prompt: str) -> tuple[str, list[str]]:
    """Return a prompt's own text and its learned guidelines, in order."""
    base, header, block = prompt.partition(GUIDELINES_HEADER)
    if not header:
        return prompt.rstrip(), []
    lines = [line.strip() for line in block.splitlines()]
    return base.rstrip(), [line[2:].strip() for line in lines if line.startswith("- ")]


def join_guidelines(base: str, guidelines: list[str]) -> str:
    """Return ``base`` followed by the guideline block (none when empty)."""
    if not guidelines:
        return base
    bullets = "\n".join(f"- {line}" for line in guidelines)
    return f"{base.rstrip()}\n\n{GUIDELINES_HEADER}\n{bullets}"


def merge_guidelines(prompt: str, added: Iterable[str]) -> str | None:
    """Add each new guideline to ``prompt`` unless it is there already.

    Returns ``None`` when the prompt cannot hold the first new guideline
    within ``MAX_PROMPT_CHARS``, even with every older guideline dropped.
    """
    base, guidelines = split_guidelines(prompt)
    newest = None
    for text in added:
        line = " ".join(text.split())[:MAX_GUIDELINE_CHARS]
        if line and _find(guidelines, line, whole=True) is None:
            guidelines.append(line)
            newest = newest or line
    if newest is None:
        return prompt
    return fit_guidelines(base, guidelines, keep=newest)


def fit_guidelines(base: str, guidelines: list[str], *, keep: str) -> str | None:
    """Drop the oldest guidelines, never ``keep``, until the prompt fits its caps."""
    lines = list(guidelines)
    while True:
        text = join_guidelines(base, lines)
        if len(text) <= MAX_PROMPT_CHARS and len(lines) <= MAX_GUIDELINES:
            return text
        droppable = [line for line in lines if line != keep]
        if not droppable:
            logger.warning(
                "prompt guideline does not fit the cap, not added chars=%d cap=%d",
                len(text),
                MAX_PROMPT_CHARS,
            )
            return None
        lines.remove(droppable[0])


def _find(guidelines: list[str], text: str, *, whole: bool = False) -> int | None:
    expected = _norm(text)
    for index, line in enumerate(guidelines):
        if (_norm(line) == expected) if whole else _norm(line).startswith(expected):
            return index
    return None


def _example(criterion: str) -> str:
    """Return a criterion as the guideline quotes it: no double quotes, clipped."""
    return _clip(criterion.replace('"', "'"), MAX_EXAMPLE_CHARS)


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, str] = {}
    for item in items:
        seen.setdefault(_norm(item), item)
    return list(seen.values())


def _norm(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
