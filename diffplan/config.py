"""Dataclass configs <-> plain dicts (YAML), with errors that name the offending key."""
from __future__ import annotations

import copy
import dataclasses
import types
import re
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict does not match the config it should build."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a mapping may not repeat a key: plain YAML keeps the last one silently,
    so a second ``n_candidates:`` further down a config would undo the first without a word."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key]}); the second would silently win",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str | bytes):
    """``yaml.safe_load`` that refuses a repeated key in a mapping (a ``yaml.YAMLError`` naming it)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def from_dict(cls: type[T], data: dict | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, checking every value against the field's type.

    Unknown keys and values of the wrong type raise ``ConfigError`` naming them. Nested dataclasses
    are built recursively, lists become tuples where the field is a tuple, ints are accepted for
    floats, and numeric strings for numbers (YAML 1.1 reads ``2e-4`` as a string). Checks in the
    dataclass's ``__post_init__`` that raise ``ValueError`` become ``ConfigError`` too.
    """
    if data is None:
        data = {}
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
        if value is None and fields[name].default is None:
            kwargs[name] = None
        else:
            kwargs[name] = _coerce(hints.get(name, Any), value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # missing required fields, range checks
        raise ConfigError(f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` as type ``hint``, or ``ConfigError`` naming ``where`` and what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                pass
        raise _wrong(hint, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_dict(hint, value, where)
        raise _wrong(hint, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _wrong(hint, value, where)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
            items = [_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [_coerce(args[0] if args else Any, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _wrong(hint, value, where)
        return value
    if hint in (int, float):
        return _number(hint, value, where)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _wrong(hint, value, where)
    return value


def _number(kind: type, value: Any, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _wrong(kind, value, where)
    try:
        number = float(value)
    except ValueError:
        raise _wrong(kind, value, where) from None
    if kind is float:
        return number
    if not number.is_integer():
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    return int(number)


def _wrong(hint: Any, value: Any, where: str) -> ConfigError:
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    expected = names.get(hint) or getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    if dataclasses.is_dataclass(hint):
        expected = f"a mapping of {hint.__name__} settings"
    return ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")


def check_fields(obj: Any, where: str | None = None) -> None:
    """Check every field of the dataclass instance ``obj`` against its type, converting in place
    as ``from_dict`` does (for configs built in Python, in ``__post_init__``)."""
    where = where or type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is not None or f.default is not None:
            setattr(obj, f.name, _coerce(hints.get(f.name, Any), value, f"{where}.{f.name}"))


def resolve_device(name: str | torch.device) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1", "mps") as a device this machine has, or ``ConfigError``."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {str(name)!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(name)!r} is not available: this torch build or machine has no "
                              "CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(name)!r} is not available: "
                              f"this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(name)!r} is not available on this machine (use --device cpu)")
    return device


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
