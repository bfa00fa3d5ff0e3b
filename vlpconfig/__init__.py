"""The one strict config loader of vlpcache: dataclasses with commented defaults, strict overrides.

`from_dict(Cls, d)` builds a (nested) dataclass from a plain mapping (YAML, JSON, --set overrides) and
raises ConfigError naming the key for an unknown key or a value of the wrong type, so a typo fails at
start-up instead of silently using a default. Range checks stay with each config (`__post_init__` or
`validate()`).

Why a package of its own: extractors/, pipeline/ and train/ all load configs, and imports flow one way
(pipeline -> extractors, stores; train -> stores). stores/ is importable by everyone but is storage, not
configuration; this tiny package imports nothing of ours, so every package may import it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["ConfigError", "check_type", "from_dict"]


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key and what is accepted."""


def from_dict(cls: type[T], d: Any, prefix: str = "") -> T:
    """Dataclass `cls` from mapping `d`, recursing into nested dataclasses; keys are reported as prefix+key."""
    if not isinstance(d, dict):
        name = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"{name} must be a mapping, got {type(d).__name__}: {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {[prefix + str(k) for k in unknown]}; known keys: {sorted(fields)}")
    return cls(**{key: check_type(prefix + key, value, hints[key]) for key, value in d.items()})


def check_type(key: str, value: Any, hint: Any) -> Any:
    """`value` if it fits the annotation `hint` (an int is accepted for a float, a bool never for an int)."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return check_type(key, value, option)
            except ConfigError:
                continue
    elif hint is Any:
        return value
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif origin is list:
        if isinstance(value, list):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {type(value).__name__}: {value!r}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
