"""Turning a TOML table into an attrs settings class.

A plugin declares its settings as an attrs class whose fields carry type
annotations; `build_settings` checks every value against its field's type and
raises `ConfigError` naming the file, the dotted key, what was expected and what
was found. Unknown keys are errors too: a typo must not silently fall back to a
default.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import attrs

from .errors import ConfigError

_SCALARS: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
}


def describe(value: Any) -> str:
    """A short, user-facing description of a TOML value."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"{shown!r} (a string)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value} (a number)"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp in _SCALARS:
        return _SCALARS[tp]
    if attrs.has(tp):
        return "a table"
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"an array of {_expected(inner).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        args = typing.get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        return f"a table of {_expected(inner).removeprefix('a ').removeprefix('an ')}s"
    if origin in (typing.Union, types.UnionType):
        parts = [_expected(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return "any value"


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    def fail() -> ConfigError:
        return ConfigError(source, key, _expected(tp), describe(value))

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            # An optional setting: its one type's error is the precise one
            # (it names the array item or table key that is wrong).
            return _convert(options[0], value, key, source)
        for option in options:
            try:
                return _convert(option, value, key, source)
            except ConfigError:
                continue
        raise fail()
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if attrs.has(tp):
        if not isinstance(value, dict):
            raise fail()
        return build_settings(tp, value, source=source, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise fail()
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(inner, item, f"{key}[{i}]", source) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        args = typing.get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        return {k: _convert(inner, v, f"{key}.{k}", source) for k, v in value.items()}
    return value


def build_settings(cls: type, table: dict[str, Any], *, source: str, prefix: str) -> Any:
    """Build the attrs class `cls` from a TOML table.

    `source` names the file (or "--upstream" for settings made from the command
    line) and `prefix` the table's dotted key, so that every error points at the
    exact line a user has to fix.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(source, key, f"one of the known keys ({known})", "an unknown key")
        kwargs[fields[name].alias or name] = _convert(hints.get(name, Any), value, key, source)
    missing = [
        name for name, f in fields.items() if f.default is attrs.NOTHING and name not in table
    ]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(source, key, _expected(hints.get(missing[0], Any)), "nothing (it is required)")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        # attrs validators raise these; their message says what is wrong.
        raise ConfigError(source, prefix or "(top level)", "a valid value", str(exc)) from None
