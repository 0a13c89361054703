"""Typed options: each plugin declares an attrs `Options` class; files and `--set` fill them in.

A config is a nested dict with one section per core component (`trainer`, `sampling`) and per plugin
kind (`algo`, `backend`, ...), plus `plugins` naming the selection. Values from YAML/TOML files and
`--set key=value` strings are converted to the declared field types here, and every error names the
key and what it accepts.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import attrs
import yaml

from rlcore.errors import ConfigError

T = TypeVar("T")


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist: pass an existing .yaml or .toml file to --config")
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(p.read_text())
        elif p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(p.read_text()) or {}
        else:
            raise ConfigError(f"config file {str(p)!r}: unknown format {p.suffix!r}; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} is not valid {p.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["algo.clip_high=0.28", ...]` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or "." not in key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set trainer.steps=100")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (list, dict)) and not raw.strip().startswith(("[", "{")):
            value = raw  # e.g. `task.ops=-`, which YAML would read as a list
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is set both as a value and as a section")
        node[leaf] = value
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base`."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        inner = args[0] if args else Any
        items = [_convert(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise bad
        try:
            f = float(value)
        except ValueError:
            raise bad from None
        if not math.isfinite(f) or f != int(f):
            raise bad
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad
        return "" if value is None else str(value)
    return value


def build_options(cls: type[T], data: dict[str, Any] | None, section: str) -> T:
    """Instantiate the attrs options class `cls` from `data`, converting and validating each key.

    Unknown keys, invalid values and options without a default left unset raise `ConfigError` naming
    `section.key` and what it accepts.
    """
    data = dict(data or {})
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields)) or "(this plugin has no options)"
        raise ConfigError(f"{section}.{unknown[0]}: unknown option; {section} accepts: {allowed}")
    kwargs = {name: _convert(v, fields[name].type, f"{section}.{name}") for name, v in data.items()}
    missing = [n for n, f in fields.items() if f.init and f.default is attrs.NOTHING and n not in kwargs]
    if missing:
        keys = " ".join(f"--set {section}.{n}=..." for n in missing)
        raise ConfigError(f"{section}: {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no default; "
                          f"give {'it' if len(missing) == 1 else 'them'}: {keys}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section}: {e}") from None


def options_to_dict(options: Any) -> dict[str, Any]:
    """The options as plain data (for printing and saving the resolved config)."""
    return attrs.asdict(options, recurse=True, value_serializer=lambda _i, _f, v: list(v) if isinstance(v, tuple) else v)


def check_choice(*choices: Any) -> Any:
    """An attrs validator whose error names the field and the allowed values."""
    def validate(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
    return validate


def check_range(low: float | None = None, high: float | None = None, auto: bool = False) -> Any:
    """An attrs validator for a finite number within [low, high] (NaN and infinities never pass), naming the
    field on failure; None passes, and "auto" too where `auto`."""
    def validate(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None or (auto and value == "auto"):
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{attribute.name}={value!r} must be a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"at most {high}" if low is None else f"in [{low}, {high}]"
            raise ValueError(f"{attribute.name}={value!r} must be {bounds}")
    return validate
