"""The public surface: exported names and the documented error tree."""

from __future__ import annotations

import inspect
import re

import hivebus
from hivebus import errors


def test_all_is_sorted_and_complete() -> None:
    exported = set(hivebus.__all__)
    assert hivebus.Team.__name__ == "Team"  # imported on first use
    public = {
        name
        for name, value in vars(hivebus).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and name not in {"annotations"}
    }
    assert hivebus.__all__ == sorted(hivebus.__all__)
    assert public - {"__version__"} <= exported


def test_every_error_derives_from_base() -> None:
    classes = [
        value
        for value in vars(errors).values()
        if inspect.isclass(value) and value.__module__ == errors.__name__
    ]
    signals = {errors.RetryLater, errors.DeadLetter}
    for cls in classes:
        if cls in signals:
            assert not issubclass(cls, errors.HivebusError), cls
        else:
            assert issubclass(cls, errors.HivebusError), cls


def test_error_tree_docstring_matches_classes() -> None:
    doc = errors.__doc__ or ""
    drawn = set(re.findall(r"^[ │]*(?:[└├]── )?([A-Z][A-Za-z]+)  ", doc, re.MULTILINE))
    drawn |= set(re.findall(r"^    (HivebusError)$", doc, re.MULTILINE))
    classes = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and value.__module__ == errors.__name__
    }
    assert classes == drawn


def test_error_tree_parents_match_drawing() -> None:
    assert issubclass(errors.SchemaError, errors.InvalidEventError)
    assert issubclass(errors.ContextConflictError, errors.ContextError)
    assert issubclass(errors.BrainReplyError, errors.BrainError)
    assert issubclass(errors.TaskNotFoundError, errors.TaskError)
