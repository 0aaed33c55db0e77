"""The program file's field checks: one line naming the field and what it expects when a document is not a program.

``Action.from_json``, ``ScheduleSpec.from_json`` and ``Program.from_json`` read every field through ``get_field``
with one of the converters below; ``ProgramFileError`` is the one error a malformed program document raises.
"""
from __future__ import annotations

import json

from topologies.errors import InputError


class ProgramFileError(InputError):
    """A program document that is not one ``Program.to_json`` writes; the message names the field and what it expects."""


_REQUIRED = object()


def as_count(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError
    return v


def as_bool(v) -> bool:
    if not isinstance(v, bool):
        raise TypeError
    return v


def get_field(d, key: str, where: str, convert, expected: str, default=_REQUIRED):
    """``d[key]`` through ``convert``: a missing required field, a ``d`` that is not an object or a value
    ``convert`` refuses is one ProgramFileError line naming ``where.key`` and what it expects."""
    if not isinstance(d, dict):
        raise ProgramFileError(f"{where}: expected an object, got {json.dumps(d)[:60]}")
    if key not in d:
        if default is _REQUIRED:
            raise ProgramFileError(f"{where}.{key} is missing; expected {expected}")
        return default
    try:
        return convert(d[key])
    except ProgramFileError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError):
        raise ProgramFileError(f"{where}.{key}: expected {expected}, got {json.dumps(d[key])[:60]}") from None


def as_list(v) -> list:
    if not isinstance(v, list):
        raise TypeError
    return v


def as_layer_ranges(v) -> tuple[tuple[int, int], ...]:
    out, nxt = [], 0
    for r in as_list(v):
        first, last = (as_count(x) for x in as_list(r))
        if first != nxt or last < first:
            raise ValueError
        out.append((first, last))
        nxt = last + 1
    if not out:
        raise ValueError
    return tuple(out)

