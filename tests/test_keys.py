"""Key names: one hash tag per channel, and no key literals outside keys.py."""

from __future__ import annotations

import pathlib
import re

import pytest

from hivebus.errors import InvalidChannelError
from hivebus.keys import Keys, check_channel, check_pattern

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "hivebus"


def hash_tag(key: str) -> str:
    start = key.index("{") + 1
    return key[start : key.index("}", start)]


def test_channel_keys_share_hash_tag() -> None:
    keys = Keys("p")
    names = [
        keys.stream("orders"),
        keys.broadcast("orders"),
        keys.retry("orders", "billing"),
        keys.redo("orders", "billing"),
        keys.dlq("orders"),
        keys.once("orders", "x"),
    ]
    assert {hash_tag(name) for name in names} == {"orders"}
    assert all(name.startswith("p:") for name in names)


def test_channel_of_reads_tag_back() -> None:
    keys = Keys("p")
    assert keys.channel_of(keys.broadcast("a.b-c")) == "a.b-c"


@pytest.mark.parametrize("name", ["orders", "a.b_c-d", "A1", "x" * 200])
def test_valid_channels_pass(name: str) -> None:
    assert check_channel(name) == name


@pytest.mark.parametrize("name", ["", " ", "a b", "a:b", "{a}", "*", "a" * 201])
def test_invalid_channels_fail(name: str) -> None:
    with pytest.raises(InvalidChannelError, match=re.escape(repr(name))):
        check_channel(name)


def test_patterns_allow_wildcards() -> None:
    assert check_pattern("orders.*") == "orders.*"
    with pytest.raises(InvalidChannelError, match="wildcards"):
        check_pattern("orders:{x}")


def test_no_key_literals_outside_keys_module() -> None:
    offenders = []
    pattern = re.compile(r"""f?["'][^"'\n]*\{[a-z_.]*prefix[a-z_.]*\}:""")
    for path in SRC.rglob("*.py"):
        if path.name == "keys.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
