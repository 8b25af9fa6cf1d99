"""Typed configs from JSON: every config is a frozen dataclass, and these two functions make a value of
the wrong type (a string learning rate, a float seed, `"model": null`, a list where an object
belongs) an error that names the field, before any arithmetic can turn it into a traceback.

    check_types(cfg)                  # first line of every config's __post_init__
    from_dict(TrainConfig, raw, "x.json")  # JSON -> config: unknown keys, nesting, tuples, types
"""

from __future__ import annotations

import dataclasses
import math
import typing
from functools import lru_cache
from typing import Any, Literal, TypeVar, Union

from workbench.errors import ConfigError

C = TypeVar("C")


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a finite number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} object"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args)))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # annotations this checker does not model (callables, forward references)


def check_types(cfg: Any) -> None:
    """Raise ConfigError naming the first field of the dataclass `cfg` whose value does not match its
    annotation. Floats must be finite; ints are not bools; Literal fields take only their options."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, tp = getattr(cfg, f.name), hints[f.name]
        if not _matches(value, tp):
            raise ConfigError(f"{type(cfg).__name__}.{f.name} must be {_describe(tp)}, got {value!r}.")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """JSON value -> the field's Python form: nested configs built, lists made tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def from_dict(cls: type[C], data: Any, where: str = "") -> C:
    """Build the config dataclass `cls` from parsed JSON, naming (with `where`, e.g. a file) any key that
    is not a field, any value of the wrong type and any section that is not an object."""
    name = cls.__name__
    at = f" in {where}" if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{name}{at} must be a JSON object ({{...}}), got {type(data).__name__} {data!r:.60}.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"Unknown {name} field(s) {unknown}{at}; valid fields: {sorted(known)}.")
    hints = _hints(cls)
    kwargs = {key: _convert(value, hints[key], f"{where}:{key}" if where else key) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{err}{' (' + where + ')' if where else ''}") from None
    except TypeError as err:  # a __post_init__ comparing a value of the wrong type
        raise ConfigError(f"{name}{at}: {err}") from err
