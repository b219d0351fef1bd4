"""Checks every job kind applies to its parameters: they arrive as user JSON from the UI
and the CLI, so each value is checked with a message that names it and its range.

Light on purpose (no torch): the checks run before a job is queued as well as in it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping


def check_whole(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}.")
    return value


def check_real(name: str, value, low: float, high: float, low_open: bool = True) -> float:
    """A finite number in (low, high], or [low, high] when low_open is False."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if (value <= low if low_open else value < low) or value > high:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}.")
    return float(value)


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")
    return value


def check_optional_bool(name: str, value) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return value


def given_params(what: str, params, known: Iterable[str]) -> dict:
    """The parameters a job was given: a JSON object of known keys, None meaning unset."""
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{what} parameters must be a JSON object, got {type(params).__name__}.")
    known = set(known)
    unknown = sorted(map(str, set(params) - known))
    if unknown:
        raise ValueError(
            f"Unknown {what} parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})."
        )
    return {k: v for k, v in params.items() if v is not None}


def json_object(text: str | None, what: str, example: str) -> dict:
    """A JSON object typed into a form field (empty means {})."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} must be a JSON object: {exc.msg}.") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, e.g. {example}.")
    return value
