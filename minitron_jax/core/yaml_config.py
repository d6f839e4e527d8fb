"""Typed configs from YAML files and `key=value` command-line overrides, for every configuration: the
distillation `RunConfig` (train/run_config.py) and the pipeline's nested `PipelineConfig` (run/pipeline.py).

A YAML file may name a `base:` file (a path relative to the YAML) whose values it overrides, section by
section; overrides use dotted paths (`distill.lr=2e-4`) and reach any depth of nested dataclasses. Values
are checked against the field types from `typing.get_type_hints`; unknown keys and values of the wrong
type fail before any work, naming the valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from minitron_jax.core.errors import RecipeError


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1", "yes"):
        return True
    if str(v).lower() in ("false", "0", "no"):
        return False
    raise ValueError(v)


class DataArg:
    """The type of `data`: a path or URL (str), or a blend of token stores {STORE: weight, ...}."""


def _data(v):
    if isinstance(v, dict):
        if not v or not all(isinstance(k, str) for k in v) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in v.values()):
            raise ValueError(v)
        return {k: float(w) for k, w in v.items()}
    if isinstance(v, (list, tuple, bool)) or v is None:
        raise ValueError(v)
    return str(v)


_CONVERT = {int: int, float: float, str: str, bool: _bool, DataArg: _data}


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint).replace("typing.", "")


class _Text:
    """An override's text and its YAML reading: a `str` field takes the text when YAML reads something
    else (`teacher=-`, `out=2024`), every other field the YAML value."""

    def __init__(self, text: str):
        self.text, self.value = text, yaml.safe_load(text) if text.strip() else None

    def get(self, hint) -> Any:
        if hint is DataArg and not isinstance(self.value, dict):  # data=-, data=2024: a path; a mapping: a blend
            return self.text
        return self.text if hint is str and self.value is not None and not isinstance(self.value, str) else self.value


def coerce(hint, value: Any, key: str) -> Any:
    """Check / convert one value against its field's type hint (int, float, str, bool, X | None,
    list[X], or a nested dataclass given as a mapping)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, _Text):
        plain = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [hint]
        value = value.get(plain[0] if len(plain) == 1 else None)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(f"{key} needs a value")
        (hint,) = [a for a in args if a is not type(None)]  # one type besides None
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"{key}={value!r}: {key} is a section; give a mapping of its keys, e.g. {key}.KEY=VALUE")
        return build(hint, value, key, prefix=key + ".")
    if value is None:
        raise RecipeError(f"{key} needs a value" + (f" (an empty list is {key}=[])" if origin is list else ""))
    if isinstance(value, dict) and hint is not DataArg:
        path = key
        while isinstance(value, dict) and value:
            path, value = f"{path}.{next(iter(value))}", next(iter(value.values()))
        raise RecipeError(f"{key} takes a value ({_type_name(hint)}), not keys: {path}= has nowhere to go; "
                          f"write {key}=VALUE")
    if origin is not list and hint not in _CONVERT:
        raise TypeError(f"{key}: the config loader does not handle fields of type {hint}")
    try:
        if origin is list:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
            return [coerce(args[0] if args else str, v, key) for v in items]
        if isinstance(value, (list, tuple)):
            raise ValueError(value)
        conv = _CONVERT[hint]
        if conv in (int, float) and isinstance(value, bool):  # YAML reads yes/true as a bool, never a number
            raise ValueError(value)
        if conv is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return conv(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{key}={value!r} is not a valid {_type_name(hint)}") from None


def build(cls, values: dict, label: str, prefix: str = ""):
    """A dataclass from a (nested) mapping: unknown keys are refused with the valid ones, every value is
    coerced to its field's type, missing ones take the class defaults. `label` names the mapping in
    errors ("recipe", "pipeline", "score"); `prefix` goes before each key ("score.")."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    if unknown := sorted(set(values) - set(fields)):
        raise RecipeError(f"unknown {label} keys {unknown}; valid keys: {', '.join(fields)}")
    return cls(**{k: coerce(hints[k], v, prefix + k) for k, v in values.items()})


def merge(base: dict, delta: dict) -> dict:
    """`delta` over `base`: mappings merge key by key (at any depth); other values replace."""
    out = dict(base)
    for k, v in delta.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML mapping; a `base: FILE` key (relative to this file) names a file whose values this one
    overrides (bases may have bases)."""
    path = Path(path)
    if path.resolve() in _seen:
        raise RecipeError(f"{path}: `base:` files form a cycle ({' -> '.join(map(str, _seen))} -> {path})")
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"cannot read config {path}: {e}") from e
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise RecipeError(f"config {path} must be a mapping of key: value")
    if (base := loaded.pop("base", None)) is None:
        return loaded
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base={base!r} must be a YAML file path (relative to {path.parent})")
    return merge(read_yaml(path.parent / base, (*_seen, path.resolve())), loaded)


def parse_overrides(overrides: list[str] | dict | None) -> dict:
    """"key=value" strings (or a dict) -> a nested mapping: "distill.lr=2e-4" -> {"distill": {"lr": 2e-4}}.
    Values are YAML ("[1,1,8]" is a list, "" is None), read once the field's type is known."""
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for item in overrides or []:
            if "=" not in item:
                raise RecipeError(f"override {item!r} must look like key=value")
            k, v = item.split("=", 1)
            text = _Text(v)
            parsed.append((k, text.value if isinstance(text.value, dict) else text))
        items = parsed
    out: dict = {}
    for key, value in items:
        *path, last = [p.strip() for p in key.split(".")]
        if not last or not all(path):
            raise RecipeError(f"override key {key!r}: expected key or section.key")
        if not path and last == "base":
            raise RecipeError("base= names a base file inside a YAML config, not on the command line: give that "
                              "file as the config and these keys as overrides")
        node = out
        for i, p in enumerate(path):
            if not isinstance(node.setdefault(p, {}), dict):  # x=1 and x.y=2 together
                raise RecipeError(f"override {key}: {'.'.join(path[:i + 1])} was given a value, not keys")
            node = node[p]
        node[last] = merge(node[last], value) if isinstance(value, dict) and isinstance(node.get(last), dict) else value
    return out


def load_values(path: str | Path | None, overrides: list[str] | dict | None = None) -> dict:
    """The YAML file's values (with its bases), then the overrides on top; not yet typed."""
    return merge(read_yaml(path) if path is not None else {}, parse_overrides(overrides))


def load(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None, label: str = "config"):
    """YAML file (optional) + overrides -> a `cls` instance (nested dataclasses included)."""
    return build(cls, load_values(path, overrides), label)


def split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """Command-line words `[CONFIG.yaml] key=value ...` -> (the file or None, the overrides)."""
    args = list(args)
    return (args.pop(0) if args and "=" not in args[0] else None), args


def dump(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2)
