"""Typed experiment configs: a YAML file plus `dotted.key=value` overrides -> a validated dataclass.

Every recipe declares its config as nested dataclasses. Validation happens before anything runs and
every error names the full key path: unknown keys (with the closest valid key), wrong types, values
out of a field's `metadata["range"]`, and missing paths for fields typed `ExistingPath`.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the key (and file) that is wrong."""


class ExistingPath(str):
    """A string config field that must name an existing file or folder."""


def missing_path(key: str, value: str) -> str:
    """The error for a config path that does not exist; one under runs/ is an earlier stage's output."""
    hint = " (an earlier run's output: run that stage first)" if value.startswith("runs/") else ""
    return f"key '{key}': path '{value}' does not exist{hint}"


def load_experiment(path: Path, _seen: tuple = ()) -> dict:
    """Read an experiment YAML. A top-level `base: other.yaml` (relative to this file) is loaded first
    and this file's keys are merged over it, sections recursively."""
    path = Path(path)
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base' must be a path to another YAML, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    if not base_path.is_file():
        raise ConfigError(f"{path}: key 'base': '{base}' not found (looked for {base_path})")
    return _merge(load_experiment(base_path, _seen + (path.resolve(),)), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping; errors name the file (and line for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4); the value is parsed as YAML (so 'null', '[1, 2]' work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': bad key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted key in a copy of `data` (intermediate mappings are created as needed)."""
    import copy
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{'.'.join(keys[:i + 1])}' is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def build(cls, data: Any, path: str = "") -> Any:
    """Construct dataclass `cls` from a mapping, validating recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping for section {cls.__name__}, "
                          f"got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{_join(path, close[0])}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{_join(path, key)}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def _convert(tp, value, key: str, metadata) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, metadata)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"key '{key}': value {_show(value)} fits none of {_type_name(tp)}")
    if value is None:
        raise ConfigError(f"key '{key}': expected {_type_name(tp)}, got null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"key '{key}': {_show(value)} is not one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key '{key}': expected a list, got {_show(value)}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_convert(item, v, f"{key}[{i}]", {}) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping, got {_show(value)}")
        return dict(value)
    if tp is Any:
        return value
    converted = _scalar(tp, value, key)
    _check_range(converted, key, metadata)
    return converted


def _scalar(tp, value, key):
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e6 written in YAML
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is ExistingPath:
        if isinstance(value, str):
            if not Path(value).expanduser().exists():
                raise ConfigError(missing_path(key, value))
            return ExistingPath(value)
    elif tp in (str, Path):
        if isinstance(value, str):
            return tp(value)
    else:
        raise ConfigError(f"key '{key}': unsupported field type {tp}")
    raise ConfigError(f"key '{key}': expected {_type_name(tp)}, got {_show(value)}")


def _check_range(value, key, metadata):
    bounds = metadata.get("range") if metadata else None
    if bounds is None or not isinstance(value, (int, float)):
        return
    lo, hi = bounds
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ConfigError(f"key '{key}': {value} is out of range {span}")


def to_dict(obj) -> Any:
    """Dataclass tree -> plain dict/list values (for writing the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, str):
        return str(obj)
    return obj


def dump_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp) -> str:
    if tp is ExistingPath:
        return "an existing path"
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
