"""Dataclass configs <-> plain dicts (YAML), with errors that name the offending key."""
from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict does not match the config it should build."""


def from_dict(cls: type[T], data: dict | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ConfigError`` naming them.

    Nested dataclasses are built recursively and lists become tuples where the field is a tuple.
    """
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys for {cls.__name__} are: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints.get(name), value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if hint is None or value is None:
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value, where)
            if typing.get_origin(arg) is tuple and isinstance(value, (list, tuple)):
                return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain YAML-safe python: tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# YAML 1.1 (PyYAML) reads `1e-4` as a string; a command-line override means the number.
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(cfg: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``cfg`` with ``KEY.PATH=VALUE`` overrides set, e.g. ``policy.horizon=64``,
    ``train.lr=1e-4``, ``policy.dim_mults=[1,2]``. Values are read as YAML scalars (or flow
    lists); whether a key exists is checked where the config is built (``from_dict``)."""
    import yaml

    out = copy.deepcopy(cfg)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. policy.horizon=64)")
        try:
            value = float(text) if _EXP_FLOAT.fullmatch(text) else yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: {text!r} is not a YAML value") from None
        *path, last = key.split(".")
        node = out
        for depth, part in enumerate(path):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[:depth + 1])} is "
                                  f"{child!r}, not a section with keys")
            node = child
        node[last] = value
    return out
