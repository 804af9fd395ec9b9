"""Lua scripts that make multi-key steps atomic; each file documents its keys."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any


@cache
def source(name: str) -> str:
    """Return the text of the script ``name`` (without the ``.lua`` suffix)."""
    return files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """The scripts registered on one client; each runs by EVALSHA."""

    def __init__(self, client: Any) -> None:
        self.schedule_retry = client.register_script(source("schedule_retry"))
        self.move_due = client.register_script(source("move_due"))
        self.dead_letter = client.register_script(source("dead_letter"))
        self.trim = client.register_script(source("trim"))
        self.breaker_allow = client.register_script(source("breaker_allow"))
        self.breaker_record = client.register_script(source("breaker_record"))
