"""Checks every job kind applies to its parameters: they arrive as user JSON from the UI
and the CLI, so each value is checked with a message that names it and its range.

Light on purpose (no torch): the checks run before a job is queued as well as in it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import ClassVar


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


# --- Params dataclasses: each field's help and allowed values live in its metadata --------

MODEL_ID_RANGE = (1, 2**62)


def param(default=MISSING, help: str = "", *, low=None, high=None, low_open: bool = False, choices=None):
    """A Params field with its help text and allowed values, as dataclass metadata (as TRL's
    configs keep their help): validation, the CLI, the Train tab and the README read it."""
    metadata = {"help": help, "low": low, "high": high, "low_open": low_open,
                "choices": tuple(choices) if choices is not None else None}
    return field(default=default, metadata=metadata)


def documented_fields(params_class) -> list[Field]:
    return [f for f in fields(params_class) if "help" in f.metadata]


def check_field(params_class, name: str, value):
    """Check one value against its field's type and metadata; None passes where the field
    may be None. Returns the value (floats as float)."""
    found = {f.name: f for f in documented_fields(params_class)}[name]
    meta, kind = found.metadata, str(found.type)
    if value is None and "None" in kind:
        return None
    if meta["choices"] is not None:
        return check_choice(name, value, meta["choices"])
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}.")
        return value
    if kind.startswith("int"):
        return check_whole(name, value, meta["low"], meta["high"])
    if kind.startswith("float"):
        return check_real(name, value, meta["low"], meta["high"], low_open=meta["low_open"])
    return value


def check_fields(params) -> None:
    """Check every documented field of a Params instance (call it from __post_init__)."""
    for f in documented_fields(type(params)):
        check_field(type(params), f.name, getattr(params, f.name))


def allowed_values(f: Field) -> str:
    """A field's allowed values in words, as every help text shows them."""
    meta, kind = f.metadata, str(f.type)
    if meta["choices"] is not None:
        text = " | ".join(meta["choices"])
    elif kind.startswith("bool"):
        text = "true | false"
    elif kind.startswith("int") and (meta["low"], meta["high"]) == MODEL_ID_RANGE:
        text = "a model id"
    elif kind.startswith("int"):
        text = f"{meta['low']:,} to {meta['high']:,}"
    elif kind.startswith("float"):
        text = f"{'(' if meta['low_open'] else '['}{meta['low']:g}, {meta['high']:g}]"
    elif kind.startswith("str"):
        text = "text"
    else:
        text = kind
    return text + (" or unset" if "None" in kind else "")


def describe(params_class) -> list[dict]:
    """Name, default (absent when required), allowed values and help of each parameter."""
    return [{"name": f.name, "allowed": allowed_values(f), "help": f.metadata["help"],
             **({} if f.default is MISSING else {"default": f.default})} for f in documented_fields(params_class)]


def markdown_table(params_class) -> str:
    rows = ["| parameter | default | allowed | what it does |", "|---|---|---|---|"]
    for p in describe(params_class):
        default = f"`{json.dumps(p['default'])}`" if "default" in p else "required"
        rows.append(f"| `{p['name']}` | {default} | {p['allowed']} | {p['help']} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class JobParams:
    """What every kind's parameters share (subclass it as a frozen dataclass): each documented
    field is checked on construction; `from_dict` reads the job's JSON object (unknown keys
    refused, None meaning unset), refuses it without a REQUIRED key, and lays the job's own
    keys over the defaults `preset_values` picks; `explicit` keeps which keys the job gave,
    so a preset's budget can still be sized by the data where the job set none."""

    LABEL: ClassVar[str] = "job"
    REQUIRED: ClassVar[Mapping[str, str]] = {}  # key -> the error when the job lacks it
    explicit: frozenset[str] = field(default=frozenset(), kw_only=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "explicit"]

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        """Defaults that depend on the given keys (a preset's budget); none unless a kind says so."""
        return {}

    @classmethod
    def from_dict(cls, params: Mapping | None):
        given = given_params(cls.LABEL, params, cls.keys())
        for key, error in cls.REQUIRED.items():
            if key not in given:
                raise ValueError(error)
        return cls(**{**cls.preset_values(given), **given}, explicit=frozenset(given))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "explicit"}
