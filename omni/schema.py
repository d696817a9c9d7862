"""Dataclasses from plain dicts (YAML, JSON), with every key and type checked.

``from_dict(SomeConfig, raw)`` builds ``SomeConfig`` recursively: unknown keys, wrong types and
impossible values raise ``ValueError`` naming the key (``model.media.audio.stack``) and what is
allowed. Recipes (``omni.config``), model parts (``model.media``, connectors, BLIP-2) and the
codec spec all read their sections through it, so a key is checked the same way wherever it lives.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any


def from_dict(cls, raw: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``raw``, checking keys and types recursively."""
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        guess = did_you_mean(unknown[0], names, prefix)
        raise ValueError(
            f"unknown key {prefix}{unknown[0]};{guess} allowed keys in "
            f"{prefix.rstrip('.') or 'the recipe'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp, value: Any, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp_ in inner[:-1]:  # the first member that takes the value (str | list[str])
            try:
                return _coerce(tp_, value, key)
            except ValueError:
                pass
        return _coerce(inner[-1], value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes/off/on as a bool
            raise ValueError(
                f"{key} must be a string, got {value!r} (YAML reads a bare no/yes/on/off as a "
                f'boolean: quote it, e.g. {key.rsplit(".", 1)[-1]}: "no")'
            )
        raise ValueError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")  # internal: a dataclass we wrote


def choice(key: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def positive(key: str, value: int):
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")


def did_you_mean(name: str, choices, prefix: str = "") -> str:
    """`` did you mean X?`` for the choice closest to a misspelled ``name``, or nothing."""
    close = difflib.get_close_matches(str(name), sorted(choices), n=1, cutoff=0.6)
    return f" did you mean {prefix}{close[0]}?" if close else ""
