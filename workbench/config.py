"""Typed configs from JSON: every config is a frozen dataclass, and these two functions make a value of
the wrong type (a string learning rate, a float seed, `"model": null`, a list where an object
belongs) an error that names the field, before any arithmetic can turn it into a traceback.

    check_types(cfg)                  # first line of every config's __post_init__
    from_dict(TrainConfig, raw, "x.json")  # JSON -> config: unknown keys, nesting, tuples, types

and the command line's flags for a config: `add_config_args` gives every field an --option (typed from
its default and annotation, helped by the docstring under it); `config_overrides` reads back those given.
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import dataclasses
import inspect
import math
import textwrap
import types
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


# -- configs as command-line flags ------------------------------------------------------------------
def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def field_docs(config_cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the convention every config here follows)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(config_cls)))
    except (OSError, TypeError, SyntaxError):  # no source available: help without descriptions
        return {}
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_config_args(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One --option per field of a frozen config dataclass, typed from its default, helped by its docstring."""
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{docs.get(f.name, '')} (default: {default!r})".strip().replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, dest=f.name, default=None, help=help_)
        elif isinstance(default, (tuple, list)):
            parser.add_argument(flag, type=_value_type(hints[f.name])[0], nargs="+", dest=f.name, default=None,
                                help=help_)
        elif isinstance(default, (int, float, str)):
            parser.add_argument(flag, type=type(default), dest=f.name, default=None, help=help_)
        elif default is None:
            value_type, many = _value_type(hints[f.name])
            parser.add_argument(flag, type=value_type, nargs="+" if many else None, dest=f.name, default=None,
                                help=help_)


def _value_type(hint: Any) -> tuple[Any, bool]:
    """(argparse `type` for one command-line value of a field annotated `hint`, whether the field is a
    list): `tuple[int, ...]` gives (int, True), `Optional[float]` (float, False), a Literal its values' type."""
    origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Union or origin is types.UnionType:
        return _value_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (tuple, list, collections.abc.Sequence):
        return (_value_type(args[0])[0] if args else str), True
    if origin is typing.Literal:
        return type(args[0]), False
    if hint is bool:
        return _parse_bool, False
    return (hint if hint in (int, float, str) else str), False


def config_overrides(args: argparse.Namespace, config_cls: type) -> dict[str, Any]:
    """The fields given on the command line (those `add_config_args` parsed to something other than None)."""
    out = {}
    for f in dataclasses.fields(config_cls):
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out
