"""Typed, frozen configs: validation helpers, YAML round trip and ``--set`` overrides.

Every component owns one frozen dataclass, validated in ``__post_init__`` with a
``ValueError`` that names the field and the allowed values. The helpers here work on any
such dataclass by reflection, so ``tokenizer/`` and ``generator/`` can define their configs
with the standard library alone and still round-trip through this module.

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[T, ...]``,
``tuple[A, B]``, ``Literal[...]`` and nested config dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


# ----------------------------------------------------------------------------- validation
def check_choice(field: str, value: object, allowed: Iterable[object]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; choose one of {allowed}")


def check_positive(field: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field}={value!r} must be {bound}")


def check_range(field: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ValueError(f"{field}={value!r} must lie in [{low}, {high}]")


# ----------------------------------------------------------------------------- conversion
def parse_resources(field: str, entries: Iterable[str]) -> dict[str, float]:
    """``("accelerator_type:H100=0.001", ...)`` -> ``{"accelerator_type:H100": 0.001}``:
    extra Ray resources, each ``name=amount`` with a positive amount."""
    out: dict[str, float] = {}
    for entry in entries:
        name, sep, amount = str(entry).rpartition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0:
            raise ValueError(
                f"{field} entry {entry!r} must look like 'resource_name=amount' with amount > 0"
            )
        out[name] = value
    return out


def _is_config(tp: object) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: object) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML shapes (lists) back."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        raise TypeError(f"{path}: Any is not a supported config field type")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, arg, value)
            except ValueError as err:
                errors.append(str(err))
        if len(errors) == 1:  # an optional section: its own error says what is wrong
            raise ValueError(errors[0])
        raise ValueError(f"{path}={value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        check_choice(path, value, args)
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path}={value!r} must be a list for {_type_name(tp)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{path}[{i}]", args[0], v) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{path}={value!r} must have {len(args)} items")
        return tuple(_coerce(f"{path}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if _is_config(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}={value!r} must be a mapping for {tp.__name__}")
        return from_dict(tp, value, _path=path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={value!r} must be a bool (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}={value!r} must be an int")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path}={value!r} must be a float")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}={value!r} must be a string")
        return value
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


def from_dict(cls: type[C], data: Mapping[str, Any], *, _path: str = "") -> C:
    """Build ``cls`` from a plain mapping; unknown keys and wrong types are errors."""
    # A config may derive fields of its children before they validate (see ExperimentConfig).
    normalize = getattr(cls, "normalize_dict", None)
    if callable(normalize):
        data = normalize(dict(data))
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = _path or cls.__name__
        raise ValueError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(names)}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{_path}.{key}" if _path else key
        kwargs[key] = _coerce(path, hints[key], value)
    try:
        return cls(**kwargs)
    except ValueError as err:  # name the field by its place in the whole config
        raise ValueError(_at_path(str(err), _path, names)) from None


def _at_path(message: str, path: str, names: set[str]) -> str:
    """A config's own validation message (``steps=0 ...`` or, with the section a class
    assumes, ``train.steps=0 ...``) with the field's full dotted path (``stage2.steps=0``)."""
    if not path:
        return message
    head, dot, rest = message.partition(".")
    if dot and " " not in head and re.split(r"[=\[ .]", rest, maxsplit=1)[0] in names:
        return f"{path}.{rest}"
    if re.split(r"[=\[ ]", message, maxsplit=1)[0] in names:
        return f"{path}.{message}"
    return message


def to_dict(cfg: object) -> dict[str, Any]:
    """Plain, YAML-safe mapping (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def to_yaml(cfg: object) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_yaml(cls: type[C], text: str) -> C:
    data = yaml.safe_load(text) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"YAML for {cls.__name__} must be a mapping, got {type(data).__name__}")
    return from_dict(cls, data)


def flatten(cfg: object, prefix: str = "") -> dict[str, Any]:
    """``{"tokenizer.channels": 16, ...}``: handy for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in to_dict(cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_dict(value, name + "."))
        else:
            out[name] = value
    return out


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----------------------------------------------------------------------------- overrides
def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _sizes_as_list(tp: Any, value: Any) -> Any:
    """``"32x32"`` for a field of ints (``tuple[int, int]``, optional or not) as ``[32, 32]``:
    sizes read as they are written, also as sweep values (where a comma separates values)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in args if typing.get_origin(a) is tuple), tp)
        args = typing.get_args(tp)
    ints = typing.get_origin(tp) is tuple and all(a in (int, Ellipsis) for a in args)
    if ints and isinstance(value, str) and re.fullmatch(r"\d+(x\d+)+", value):
        return [int(v) for v in value.split("x")]
    return value


def _set_path(data: dict[str, Any], cls: type, keys: list[str], value: Any, full: str) -> None:
    hints = _hints(cls)
    head = keys[0]
    if head not in hints:
        known = sorted(f.name for f in dataclasses.fields(cls))
        raise ValueError(
            f"unknown config key {full!r}: {cls.__name__} has no {head!r}; known keys: {known}"
        )
    if len(keys) == 1:
        tp = hints[head]
        # "--set a.b=1" for a float field is fine; str fields accept any scalar text.
        if tp is str and value is not None and not isinstance(value, str):
            value = str(value)
        data[head] = _sizes_as_list(tp, value)
        return
    sub = hints[head]
    if typing.get_origin(sub) in (typing.Union, types.UnionType):
        sub = next((a for a in typing.get_args(sub) if _is_config(a)), sub)
    if not _is_config(sub):
        raise ValueError(
            f"unknown config key {full!r}: {head!r} is a {_type_name(sub)}, not a section"
        )
    if not isinstance(data.get(head), dict):
        data[head] = {}
    _set_path(data[head], sub, keys[1:], value, full)


def apply_overrides(cfg: C, overrides: Sequence[str]) -> C:
    """Return a copy of ``cfg`` with ``["a.b=value", ...]`` applied and re-validated."""
    data = to_dict(cfg)
    # A field the config derives from others (``DERIVED_FIELDS``) is derived anew unless an
    # override sets it, so "data.frames=8" moves a derived input size along.
    for path in getattr(type(cfg), "DERIVED_FIELDS", ()):
        *parents, leaf = path.split(".")
        section = data
        for key in parents:
            section = section.get(key) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(leaf, None)
    for item in overrides:
        keys, value = _parse_override(item)
        _set_path(data, type(cfg), keys, value, item.split("=", 1)[0])
    return from_dict(type(cfg), data)
