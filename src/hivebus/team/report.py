"""A task's report: everything stored about it, as JSON and as Markdown.

The JSON report is what ``hivebus tasks show ID --json`` prints: the task
record, its plan, each story with its rounds and results, the worker on
(or the wait for) each open piece of work, tokens per role, every brain call with
the prompt version it used, the prompt changes the task caused, and its
events as a tree linked by causation id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hivebus.team.client import TaskClient
from hivebus.team.state import TaskRecord, TaskStore, now_ms
from hivebus.team.tree import event_tree, tree_lines
from hivebus.team.work import Story, TestReport


async def build_report(client: TaskClient, task_id: str) -> dict[str, Any]:
    """Return the full report of a task as JSON-ready data."""
    task = await client.get(task_id)
    store = client.store
    plan = await store.plan(task.id, task.plan_version) if task.plan_version else None
    stories = await store.stories(task.id, task.plan_version) if plan else []
    events = await store.events(task.id)
    ended_ms = task.ended_ms or now_ms()
    return {
        "task": task.to_dict(),
        "seconds": round((ended_ms - task.created_ms) / 1000, 3),
        "plan": plan.model_dump() if plan else None,
        "stories": [await _story(store, task, story) for story in stories],
        "board": await client.progress.board(task.id),
        "tokens": await store.tokens(task.id),
        "calls": await store.calls(task.id),
        "prompt_changes": await store.prompt_changes(task.id),
        "dead_letters": await store.dead_letters(task.id),
        "events": events,
        "tree": event_tree(events),
    }


async def _story(store: TaskStore, task: TaskRecord, story: Story) -> dict[str, Any]:
    state = await store.story(task.id, story.key)
    rounds = int(state.get("round", "0"))
    results = []
    for number in range(1, rounds + 1):
        implementation = state.get(f"impl_json:{number}")
        report = state.get(f"report:{number}")
        verdict = TestReport.model_validate_json(report) if report else None
        results.append(
            {
                "round": number,
                "implementation": json.loads(implementation)
                if implementation
                else None,
                "implementation_event": state.get(f"impl:{number}"),
                "passed": verdict.passed if verdict else None,
                "findings": [f.model_dump() for f in verdict.findings]
                if verdict
                else [],
                "test_event": state.get(f"test:{number}"),
            }
        )
    design = state.get("design_json")
    return {
        "key": story.key,
        "title": story.title,
        "acceptance_criteria": story.acceptance_criteria,
        "needs_design": story.needs_design,
        "status": state.get("status", "planned"),
        "rounds": rounds,
        "max_rounds": task.max_test_rounds,
        "reason": state.get("reason"),
        "design": json.loads(design) if design else None,
        "results": results,
        "open_work": await _open_work(store, task, story, state),
    }


async def _open_work(
    store: TaskStore, task: TaskRecord, story: Story, state: dict[str, str]
) -> list[dict[str, Any]]:
    """Return each piece of work the story waits for, with its holder or its age."""
    if task.ended or state.get("status") in (None, "passed", "failed"):
        return []
    number = int(state.get("round", "1"))
    wanted: list[tuple[str, int, int]] = []
    if f"impl:{number}" not in state:
        wanted.append(("developer", number, int(state.get("round_started_ms", "0"))))
    elif f"test:{number}" not in state:
        wanted.append(("tester", number, int(state.get("testing_since_ms", "0"))))
    if story.needs_design and "design" not in state:
        wanted.append(("ux", 1, int(state.get("assigned_ms", "0"))))
    now = now_ms()
    work = []
    for role, round_number, since_ms in wanted:
        holder = await store.holder(task.id, f"{story.key}:{role}:{round_number}")
        item: dict[str, Any] = {"role": role, "round": round_number}
        if holder is not None:
            item["state"] = "working"
            item["worker"] = holder.get("worker")
            item["seconds"] = round((now - int(holder.get("since_ms", now))) / 1000, 1)
        else:
            item["state"] = "waiting"
            item["seconds"] = round((now - since_ms) / 1000, 1) if since_ms else None
        work.append(item)
    return work


def render_markdown(report: dict[str, Any]) -> str:
    """Return the report as a Markdown document."""
    lines = _head_markdown(report)
    if report["plan"]:
        plan = report["plan"]
        lines += ["## Plan", "", plan["summary"], ""]
        lines += [f"1. **{step['title']}**: {step['goal']}" for step in plan["steps"]]
        lines.append("")

    lines += ["## Stories", ""]
    for story in report["stories"]:
        lines += _story_markdown(story)

    lines += _tokens_markdown(report["tokens"])
    lines += ["", "## Prompt changes", ""]
    for change in report["prompt_changes"]:
        lines.append(f"- {change['role']} v{change['version']}: {change['reason']}")
    if not report["prompt_changes"]:
        lines.append("None.")
    lines += ["", "## Events", "", *tree_lines(report["tree"]), ""]
    return "\n".join(lines)


def _head_markdown(report: dict[str, Any]) -> list[str]:
    task = report["task"]
    reason = f" ({task['reason']})" if task.get("reason") else ""
    return [
        f"# Task {task['id']}",
        "",
        f"- **status:** {task['status']}{reason}",
        f"- **task:** {task['text']}",
        f"- **project:** {task['project']}",
        f"- **time taken:** {report['seconds']:.1f} s",
        f"- **tokens:** {report['tokens'].get('task', {}).get('total', 0)}",
        "",
    ]


def _tokens_markdown(tokens: dict[str, dict[str, int]]) -> list[str]:
    lines = ["## Tokens by role", "", "| role | prompt | completion | calls |"]
    lines.append("| --- | --- | --- | --- |")
    for role, totals in tokens.items():
        if role != "task":
            lines.append(
                f"| {role} | {totals.get('prompt', 0)} | "
                f"{totals.get('completion', 0)} | {totals.get('calls', 0)} |"
            )
    return lines


def _story_markdown(story: dict[str, Any]) -> list[str]:
    lines = [
        f"### {story['key']}: {story['title']}",
        "",
        f"- status: {story['status']}, rounds: {story['rounds']} of "
        f"{story['max_rounds']}",
    ]
    if story.get("reason"):
        lines.append(f"- reason: {story['reason']}")
    lines += [f"- criterion: {text}" for text in story["acceptance_criteria"]]
    for result in story["results"]:
        verdict = {True: "passed", False: "failed", None: "not tested"}[
            result["passed"]
        ]
        lines.append(f"- round {result['round']}: {verdict}")
        lines += [f"  - finding: {f['criterion']}" for f in result["findings"]]
    lines.append("")
    return lines


def write_report(report: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write the report as ``ID.md`` and ``ID.json`` under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    task_id = report["task"]["id"]
    markdown = directory / f"{task_id}.md"
    data = directory / f"{task_id}.json"
    markdown.write_text(render_markdown(report), encoding="utf-8")
    data.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return markdown, data
