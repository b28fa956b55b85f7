"""The typed config machinery every cltk mode shares: dataclass fields with a line of help, loaded from
YAML with type conversion, did-you-mean for unknown keys and ``key.sub=value`` overrides, and the rows of
a reference page. Errors are :class:`~cltk.errors.ConfigError` naming the key.

The run config (:mod:`cltk.config`) and the continual NER config (:mod:`cltk.ner.config`) are schemas on
top of it; nothing here knows either.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from cltk.errors import ConfigError

# fields a schema keeps for itself: never read from YAML, never listed
INTERNAL = ("base_dir", "sections")


def option(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a line of help (``cltk config-reference``); no default: required."""
    kw: dict[str, Any] = {"metadata": {"help": text}}
    if factory is not dataclasses.MISSING:
        kw["default_factory"] = factory
    else:
        kw["default"] = default
    return field(**kw)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(tp):
            return None
        raise ConfigError(key, "must not be empty")
    errors = []
    for a in args:
        try:
            return convert(value, a, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(key, errors[0].split(": ", 1)[-1] if errors else "bad value")


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads 3e-4 as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    return value


def convert(value: Any, tp: Any, key: str) -> Any:
    """Check and convert ``value`` to the annotated type ``tp``; errors name ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return build(tp, value, key)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    return _convert_scalar(value, tp, key)


def build(
    cls: type, raw: dict[str, Any], prefix: str = "", sections: dict[str, type] | None = None
) -> Any:
    """``cls(**raw)`` with every value converted to its field's type.

    Args:
        cls: a dataclass whose fields are the section's keys.
        raw: the section's mapping (``sections``' keys are popped from it).
        prefix: the section's key, for messages (``train``).
        sections: optional top-level sections by name, each loaded into its dataclass and handed to
            ``cls`` as one ``sections`` mapping (a null section is left out).
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in INTERNAL]
    names = [f.name for f in fields]
    kwargs: dict[str, Any] = {}
    if sections is not None:
        loaded = {}
        for k in [k for k in raw if k in sections]:
            value = raw.pop(k)
            if value is not None:
                loaded[k] = convert(value, sections[k], str(k))
        kwargs["sections"] = loaded
        names = names + list(sections)
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(key, f"unknown key; {hint}")
        kwargs[k] = convert(v, hints[k], key)
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            raise ConfigError(f"{prefix}.{f.name}" if prefix else f.name, "is required")
    return cls(**kwargs)


def set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the raw mapping."""
    if "=" not in assignment:
        raise ConfigError(assignment, "an override must look like key.sub=value")
    key, value = assignment.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"'{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def read_raw(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[dict, Path]:
    """The mapping a YAML config file holds, with ``key.sub=value`` overrides applied, and the file's
    directory (relative paths resolve against it)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file {p} not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("", f"{p} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError("", f"{p} must hold a mapping of sections, got {type(raw).__name__}")
    for o in overrides or []:
        set_override(raw, o)
    return raw, p.resolve().parent


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return ""


def describe(
    cls: type, prefix: str = "", sections: list[tuple[str, str, type]] | None = None
) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows of every key of ``cls`` and its sub-sections, then of each
    optional ``(name, help, dataclass)`` section, for a reference page."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in INTERNAL:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            sub = tp if dataclasses.is_dataclass(tp) else inner[0]
            rows.append(
                (key, "section" + (" (optional)" if inner else ""), "", f.metadata.get("help", ""))
            )
            rows.extend(describe(sub, key + "."))  # type: ignore[arg-type]
            continue
        tname = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        tname = tname.replace("NoneType", "None")
        rows.append((key, tname, _default(f), f.metadata.get("help", "")))
    for name, text, sub in sections or []:
        rows.append((prefix + name, "section (optional)", "", text))
        rows.extend(describe(sub, f"{prefix}{name}."))
    return rows
