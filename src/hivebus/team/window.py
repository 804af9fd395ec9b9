"""Fitting a prompt into a model's context window by a fixed, visible rule.

The rule works on the sections of a prompt made by ``compose_prompt``,
which orders them from the task (first) to the newest input (last):

1. A prompt within the budget is sent unchanged.
2. Otherwise sections are given room in this order until the budget is
   spent: the first section (the task), the last one (the newest input),
   then the others from newest to oldest. Each section first gets
   ``SECTION_RESERVE_CHARS`` for its heading and a marker.
3. A section that only partly fits keeps its first two thirds and its last
   third of the allowed length, around a marker with the number of
   characters cut. A section left less than ``MIN_SECTION_CHARS`` is
   replaced by a marker with its original length.

Every cut is returned as a note, so the caller can record where it trimmed.
"""

from __future__ import annotations

from hivebus.team.brain import join_sections, split_prompt

SECTION_RESERVE_CHARS = 120
MIN_SECTION_CHARS = 200


def fit_prompt(prompt: str, budget_chars: int) -> tuple[str, list[str]]:
    """Trim ``prompt`` to about ``budget_chars`` by the rule above; return it and cuts.

    Each cut reads "trimmed section 'plan' from 9000 to 3000 characters" or
    "omitted section 'context' (9000 characters)".
    """
    if len(prompt) <= budget_chars:
        return prompt, []
    sections = split_prompt(prompt)
    count = len(sections)
    order = list(dict.fromkeys([0, count - 1, *range(count - 2, 0, -1)]))
    remaining = budget_chars - SECTION_RESERVE_CHARS * count
    allowed: dict[int, int] = {}
    for index in order:
        allowed[index] = max(0, min(len(sections[index][1]), remaining))
        remaining -= allowed[index]
    fitted: list[tuple[str, str]] = []
    cuts: list[str] = []
    for index, (name, body) in enumerate(sections):
        keep = allowed[index]
        label = f"section {name!r}" if name else "the prompt"
        if keep >= len(body):
            fitted.append((name, body))
        elif keep >= MIN_SECTION_CHARS:
            fitted.append((name, _cut_middle(body, keep)))
            cuts.append(f"trimmed {label} from {len(body)} to {keep} characters")
        else:
            marker = f"[{len(body)} characters omitted to fit the context window]"
            fitted.append((name, marker))
            cuts.append(f"omitted {label} ({len(body)} characters)")
    return join_sections(fitted), cuts


def _cut_middle(body: str, keep: int) -> str:
    head = keep * 2 // 3
    tail = keep - head
    marker = (
        f"\n[... {len(body) - keep} characters trimmed to fit the context window ...]\n"
    )
    return body[:head] + marker + body[len(body) - tail :]
