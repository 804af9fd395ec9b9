"""The outcome of a task, read back from Redis as input to the prompt analyser."""

from __future__ import annotations

from collections import defaultdict

from hivebus.team.analyser import DeadLettered, Outcome, RoundVerdict
from hivebus.team.brain import Rejection
from hivebus.team.state import TaskRecord, TaskStore
from hivebus.team.work import ROLES, Role, TestReport


async def build_outcome(store: TaskStore, task: TaskRecord, status: str) -> Outcome:
    """Return the task's test verdicts, dead letters, rejections and time per role."""
    rounds: list[RoundVerdict] = []
    for story in await store.stories(task.id, task.plan_version):
        state = await store.story(task.id, story.key)
        for number in range(1, int(state.get("round", "1")) + 1):
            report = state.get(f"report:{number}")
            if report is None:
                continue
            verdict = TestReport.model_validate_json(report)
            rounds.append(
                RoundVerdict(
                    story_key=story.key,
                    round=number,
                    passed=verdict.passed,
                    findings=tuple(verdict.findings),
                    event_id=state.get(f"test:{number}", ""),
                )
            )
    rejections: dict[Role, list[Rejection]] = defaultdict(list)
    durations: dict[Role, float] = defaultdict(float)
    for call in await store.calls(task.id):
        role = call.get("role")
        if role not in ROLES:
            continue
        durations[role] += float(call.get("seconds", 0.0))
        for item in call.get("rejections", []):
            rejections[role].append(Rejection(item["kind"], item["detail"]))
    dead = [
        DeadLettered(
            event_id=str(notice.get("event_id") or ""),
            event_type=str(notice.get("event_type") or ""),
            reason=str(notice.get("reason") or ""),
        )
        for notice in await store.dead_letters(task.id)
    ]
    return Outcome(
        task_id=task.id,
        status=status,
        rounds=tuple(rounds),
        dead_letters=tuple(dead),
        durations=dict(durations),
        rejections={role: tuple(items) for role, items in rejections.items()},
    )
