"""Reading a model's reply text as an instance of the requested pydantic model.

Parsing is lenient where that is safe: a Markdown fence, prose before or
after the JSON, ``//`` comments and trailing commas outside strings are
accepted. A reply that still fails is rejected with a ``Rejection`` of kind
``json`` (not JSON), ``schema`` (JSON that does not fit the model) or
``truncated`` (cut off at the token limit). The rejection's detail is
written for the model, which is shown it so that it can correct itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, get_origin

from pydantic import BaseModel, ValidationError

from hivebus.team.brain import ModelT, Rejection, Usage

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)
_DECODER = json.JSONDecoder()
MAX_ERRORS_SHOWN = 10


@dataclass(frozen=True, slots=True)
class Completion:
    """One reply of the model: its text, why it stopped, what it cost."""

    text: str
    finish_reason: str | None
    usage: Usage


class ReplyRejectedError(Exception):
    """A model reply that could not be used; carries the ``Rejection``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.rejection = Rejection(kind=kind, detail=detail)


def parse_reply(completion: Completion, schema: type[ModelT]) -> ModelT:
    """Return the reply as an instance of ``schema``, or raise ``ReplyRejectedError``.

    A reply cut off at the token limit (``finish_reason == "length"``) that
    does not parse or validate is rejected as ``truncated``; one that does
    is accepted.
    """
    cut_off = completion.finish_reason == "length"
    try:
        data = load_json(completion.text)
    except json.JSONDecodeError as exc:
        if cut_off:
            raise _truncated(completion, exc.msg) from None
        kind = "json"
        detail = (
            f"the reply is not valid JSON: {exc.msg} "
            f"(line {exc.lineno} column {exc.colno})"
        )
        raise ReplyRejectedError(kind, detail) from None
    try:
        return schema.model_validate(_unwrap(data, schema))
    except ValidationError as exc:
        if cut_off:
            raise _truncated(completion, "the object is incomplete") from None
        kind = "schema"
        detail = f"the reply does not fit the {schema.__name__} schema: {_errors(exc)}"
        raise ReplyRejectedError(kind, detail) from None


def load_json(text: str) -> Any:
    """Return the first JSON value in ``text``, after any fence and prose.

    Tries the text as it is, then with ``//`` comments and trailing commas
    removed outside strings. Raises ``json.JSONDecodeError``.
    """
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if not starts:
        msg = "no JSON object found"
        raise json.JSONDecodeError(msg, body, 0)
    body = body[min(starts) :]
    try:
        return _DECODER.raw_decode(body)[0]
    except json.JSONDecodeError:
        return _DECODER.raw_decode(strip_comments(body))[0]


def strip_comments(text: str) -> str:
    """Remove ``//`` comments and trailing commas that stand outside JSON strings.

    JSON strings cannot hold a raw newline, so tracking quotes and escapes
    line by line is enough to tell a comment from a URL inside a string.
    """
    out: list[str] = []
    index, in_string = 0, False
    while index < len(text):
        char = text[index]
        if in_string:
            out.append(char)
            if char == "\\":
                out.append(text[index + 1 : index + 2])
                index += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            out.append(char)
        elif text.startswith("//", index):
            end = text.find("\n", index)
            index = len(text) if end < 0 else end
            continue
        elif char in "}]":
            _drop_trailing_comma(out)
            out.append(char)
        else:
            out.append(char)
        index += 1
    return "".join(out)


def _drop_trailing_comma(out: list[str]) -> None:
    position = len(out) - 1
    while position >= 0 and out[position].isspace():
        position -= 1
    if position >= 0 and out[position] == ",":
        del out[position]


def _unwrap(data: Any, schema: type[BaseModel]) -> Any:
    """Wrap a bare list in the schema's only required field, if that is a list."""
    if not isinstance(data, list):
        return data
    fields = schema.model_fields
    required = [name for name, info in fields.items() if info.is_required()]
    if len(required) == 1 and get_origin(fields[required[0]].annotation) is list:
        return {required[0]: data}
    return data


def _errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:MAX_ERRORS_SHOWN]:
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _truncated(completion: Completion, reason: str) -> ReplyRejectedError:
    detail = (
        f"the reply was cut off at the token limit after {len(completion.text)} "
        f"characters (finish_reason=length; {reason})"
    )
    return ReplyRejectedError("truncated", detail)
