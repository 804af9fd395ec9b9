"""Prompt analysis: rule and model analysers, guideline caps, and stored changes."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from hivebus.team.analyser import (
    COVER_EVERY_CRITERION,
    GUIDELINES_HEADER,
    MAX_EXAMPLES,
    MAX_GUIDELINES,
    DeadLettered,
    LLMAnalyser,
    Outcome,
    PromptChange,
    RoundVerdict,
    RuleAnalyser,
    improve_prompts,
    merge_guidelines,
    split_guidelines,
)
from hivebus.team.brain import STORY, TASK, Ask, Rejection, compose_prompt
from hivebus.team.offline import OfflineBrain
from hivebus.team.openai_brain import OpenAIBrain
from hivebus.team.prompts import DEFAULT_PROMPTS, MAX_PROMPT_CHARS, PromptStore
from hivebus.team.work import Finding, Implementation, Role, StoryList, TestReport
from tests.fake_llm import FakeLLM, Reply

DEVELOPER = DEFAULT_PROMPTS["developer"]
TASK_TEXT = (
    "Add CSV export to the orders page: filter by date range, include totals, "
    "record who exported"
)


def failed(criterion: str, *, story: str = "S1", event: str = "evt-1") -> RoundVerdict:
    finding = Finding(criterion=criterion, detail=f"{criterion} is missing")
    return RoundVerdict(story, 1, passed=False, findings=(finding,), event_id=event)


def outcome(*rounds: RoundVerdict, **extra: Any) -> Outcome:
    return Outcome(task_id="t-1", status="completed", rounds=rounds, **extra)


async def analyse(result: Outcome, developer: str = DEVELOPER) -> list[PromptChange]:
    prompts: Mapping[Role, str] = {**DEFAULT_PROMPTS, "developer": developer}
    return await RuleAnalyser().analyse(result, prompts)


# -- the rule analyser ---------------------------------------------------------


async def test_finding_becomes_developer_guideline() -> None:
    changes = await analyse(outcome(failed("record who exported")))

    (change,) = changes
    base, guidelines = split_guidelines(change.text)
    assert change.role == "developer"
    assert base == DEVELOPER
    assert len(guidelines) == 1
    assert guidelines[0].startswith(COVER_EVERY_CRITERION)
    assert '"record who exported"' in guidelines[0]
    assert GUIDELINES_HEADER in change.text
    assert 'S1 round 1: "record who exported"' in change.reason
    assert "t-1" in change.reason
    assert change.triggers == ("evt-1",)


async def test_same_finding_changes_nothing() -> None:
    (first,) = await analyse(outcome(failed("record who exported")))

    again = await analyse(outcome(failed("record who exported")), first.text)

    assert again == []


async def test_new_criterion_updates_examples() -> None:
    text = DEVELOPER
    for criterion in ["alpha", "beta", "gamma", "delta"]:
        (change,) = await analyse(outcome(failed(criterion)), text)
        text = change.text

    _, guidelines = split_guidelines(text)
    assert len(guidelines) == 1
    assert guidelines[0].count('"') == 2 * MAX_EXAMPLES
    assert '"alpha"' not in guidelines[0]
    assert '"delta"' in guidelines[0]


async def test_long_quoted_criterion_clipped_once() -> None:
    criterion = 'the "Export" button ' + "x" * 150
    (first,) = await analyse(outcome(failed(criterion)))

    again = await analyse(outcome(failed(criterion, event="evt-2")), first.text)

    _, guidelines = split_guidelines(first.text)
    assert again == []
    assert "'Export'" in guidelines[0]
    assert guidelines[0].count('"') == 2
    assert len(guidelines[0]) < 250


async def test_passing_outcome_changes_nothing() -> None:
    passed = RoundVerdict("S1", 1, passed=True, event_id="evt-9")
    dead = DeadLettered("evt-5", "story.assigned", "handler kept failing")

    changes = await analyse(outcome(passed, dead_letters=(dead,)))

    assert changes == []


async def test_rejections_become_role_guideline() -> None:
    rejections = {
        "pm": (
            Rejection("schema", "stories.1.acceptance_criteria: Field required"),
            Rejection("schema", "stories.0.key: Field required"),
            Rejection("json", "not valid JSON"),
        )
    }

    (change,) = await analyse(outcome(rejections=rejections))

    _, guidelines = split_guidelines(change.text)
    assert change.role == "pm"
    assert len(guidelines) == 2
    assert "2 schema, 1 json" in change.reason
    assert "acceptance_criteria" in change.reason
    assert change.triggers == ("t-1",)


async def test_prompt_stays_under_cap() -> None:
    filler = "x" * (MAX_PROMPT_CHARS - len(DEVELOPER) - 450)
    crowded = merge_guidelines(DEVELOPER + filler, ["An old guideline " * 20])
    assert crowded is not None

    (change,) = await analyse(outcome(failed("include totals")), crowded)

    _, guidelines = split_guidelines(change.text)
    assert len(change.text) <= MAX_PROMPT_CHARS
    assert len(guidelines) == 1
    assert guidelines[0].startswith(COVER_EVERY_CRITERION)


def test_guideline_count_capped() -> None:
    text: str | None = DEVELOPER
    for n in range(MAX_GUIDELINES + 3):
        assert text is not None
        text = merge_guidelines(text, [f"Guideline number {n}."])

    assert text is not None
    _, guidelines = split_guidelines(text)
    assert len(guidelines) == MAX_GUIDELINES
    assert guidelines[0] == "Guideline number 3."
    assert guidelines[-1] == f"Guideline number {MAX_GUIDELINES + 2}."


def test_merge_skips_duplicates() -> None:
    once = merge_guidelines(DEVELOPER, ["Name every file you change."])
    assert once is not None

    twice = merge_guidelines(once, ["name every file  you change"])

    assert twice == once


# -- the model-backed analyser ---------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    server = FakeLLM().start()
    yield server
    server.stop()


async def test_llm_analyser_merges_advice(fake: FakeLLM) -> None:
    advice = {
        "advice": [
            {
                "role": "developer",
                "guideline": "Name the test that proves each criterion.",
                "reason": "S1 missed a criterion",
            },
            {
                "role": "developer",
                "guideline": "Name the test that proves each criterion",
                "reason": "S1 missed a criterion",
            },
        ]
    }
    fake.script("analyst", Reply.of(advice))
    brain = OpenAIBrain(fake.url, "test-model", timeout=5)
    dead = DeadLettered("evt-5", "story.assigned", "handler kept failing")
    result = outcome(failed("include totals", event="evt-3"), dead_letters=(dead,))
    try:
        changes = await LLMAnalyser(brain).analyse(result, DEFAULT_PROMPTS)
    finally:
        await brain.aclose()

    (change,) = changes
    _, guidelines = split_guidelines(change.text)
    assert change.role == "developer"
    assert guidelines == ["Name the test that proves each criterion."]
    assert change.reason == "S1 missed a criterion"
    assert change.triggers == ("evt-3", "evt-5")
    sent = json.loads(
        fake.requests[0].last_user.split("## outcome\n")[1].split("\n")[0]
    )
    assert sent["rounds"][0]["findings"][0]["criterion"] == "include totals"
    assert sent["dead_letters"][0]["event_id"] == "evt-5"


async def test_llm_analyser_falls_back_to_rules() -> None:
    result = outcome(failed("include totals"))

    changes = await LLMAnalyser(OfflineBrain()).analyse(result, DEFAULT_PROMPTS)

    (change,) = changes
    assert COVER_EVERY_CRITERION in change.text


# -- storing changes (Redis) -----------------------------------------------


async def store_on(make_bus: Any) -> PromptStore:
    bus = make_bus()
    await bus.connect()
    return PromptStore(bus.client, bus.keys)


async def test_improve_prompts_stores_version(make_bus: Any) -> None:
    store = await store_on(make_bus)

    stored = await improve_prompts(
        store, RuleAnalyser(), outcome(failed("include totals", event="evt-7"))
    )

    (created,) = stored
    history = await store.history("developer")
    assert created.version == 2
    assert [v.version for v in history] == [1, 2]
    assert history[1].triggers == ("evt-7",)
    assert "include totals" in history[1].reason
    assert (await store.current("developer")).text == created.text


async def test_improve_prompts_rebases_on_conflict(make_bus: Any) -> None:
    store = await store_on(make_bus)
    other = await store_on(make_bus)

    class RacingAnalyser(RuleAnalyser):
        """Lets another process store a version while the first analysis runs."""

        raced = False

        async def analyse(
            self, result: Outcome, prompts: Mapping[Role, str]
        ) -> list[PromptChange]:
            if not self.raced:
                self.raced = True
                text = merge_guidelines(DEVELOPER, ["Keep functions short."])
                assert text is not None
                await other.propose("developer", text, reason="other task")
            return await super().analyse(result, prompts)

    stored = await improve_prompts(
        store, RacingAnalyser(), outcome(failed("include totals"))
    )

    (created,) = stored
    _, guidelines = split_guidelines(created.text)
    assert created.version == 3
    assert guidelines[0] == "Keep functions short."
    assert guidelines[1].startswith(COVER_EVERY_CRITERION)


async def test_offline_loop_fails_then_passes(make_bus: Any) -> None:
    store = await store_on(make_bus)
    brain = OfflineBrain()
    pm = await brain.think(
        Ask(
            "pm",
            DEFAULT_PROMPTS["pm"],
            compose_prompt({TASK: TASK_TEXT}),
            StoryList,
            "t-1",
        )
    )
    story = pm.value.stories[0]

    async def run_round(number: int) -> TestReport:
        system = (await store.current("developer")).text
        sections = {TASK: TASK_TEXT, STORY: story}
        work = await brain.think(
            Ask("developer", system, compose_prompt(sections), Implementation, "t-1")
        )
        sections["implementation"] = work.value.model_dump_json()
        report = await brain.think(
            Ask(
                "tester",
                DEFAULT_PROMPTS["tester"],
                compose_prompt(sections),
                TestReport,
                "t-1",
            )
        )
        return report.value

    before = await run_round(1)
    verdict = RoundVerdict(
        story.key, 1, before.passed, tuple(before.findings), event_id="evt-test-1"
    )
    stored = await improve_prompts(store, RuleAnalyser(), outcome(verdict))
    after = await run_round(1)

    assert before.passed is False
    assert [f.criterion for f in before.findings] == ["record who exported"]
    assert [v.version for v in stored] == [2]
    assert (await store.current("developer")).version == 2
    assert after.passed is True
