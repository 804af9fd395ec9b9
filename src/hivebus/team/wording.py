"""Small helpers for the text of progress lines and summaries."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """Return "1 round" or "2 rounds": the count with the noun in the right number."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
