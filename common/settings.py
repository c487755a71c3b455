"""Config sections read into dataclasses, one way for every section: recipes, SFT and demo configs, reward plugin
settings, remote reward entries and sweep files.

Unknown keys are errors with a suggestion, not silently ignored: a typo in ``epsilon_hgih`` would otherwise run a
whole experiment with the default. Scalars are checked against the field's type, so ``max_steps: ten`` fails when
the file loads, not an hour later. A plugin's constructor is read into a dataclass too (:func:`settings_class`),
so its settings fail the same way. Every config file takes overrides in one syntax, ``section.key=value`` (the value
read as YAML): ``vocalign train --set``, ``vocalign sft --set``, ``make-demo-tts --set`` and sweep files.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")

# what each scalar type is called in an error, and which values it takes (bool is an int to Python, not to a config)
_SCALARS: dict[type, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where) if len(args) == 1 else value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-6 as a string
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {value!r:.100}") from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r:.100}")
        return float(value)
    if tp in _SCALARS:
        what, accepts = _SCALARS[tp]
        if not accepts(value):
            raise ValueError(f"{where} must be {what}, got {value!r:.100}")
    return value


def _key_path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses; unknown keys are errors, and so
    are missing ones for fields without a default and scalars of the wrong type. Every config section is read
    through here, so a typo or an omission reads the same in every section. ``where`` is the section's dotted path
    ("": the top level)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = [f.name for f in fields]
    unknown = [k for k in data if k not in names]
    if unknown:
        hints_text = "; ".join(
            f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else "")
            for k in unknown)
        raise ValueError(f"unknown key(s) in {where or 'the top level'}: {hints_text}")
    missing = [f.name for f in fields if f.init and data.get(f.name) is None  # `key:` with no value is YAML's null
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required key(s) {', '.join(_key_path(where, k) for k in missing)} "
                         f"({cls.__name__} has no default for them)")
    kwargs = {k: _convert(v, hints[k], _key_path(where, k)) for k, v in data.items()}
    return cls(**kwargs)


_UNRESOLVABLE = (NameError, AttributeError, TypeError, SyntaxError)  # what evaluating an annotation string raises


def _parameter_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotation of each of ``factory``'s parameters; one that does not resolve (a name imported only
    under TYPE_CHECKING) is left out, so that parameter takes anything while the others are still checked."""
    function = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    try:
        return typing.get_type_hints(function)
    except _UNRESOLVABLE:
        pass
    annotations = getattr(function, "__annotations__", {})
    globalns = getattr(inspect.unwrap(function), "__globals__", {})
    hints = {}
    for name, annotation in annotations.items():
        try:
            hints |= typing.get_type_hints(types.SimpleNamespace(__annotations__={name: annotation}), globalns)
        except _UNRESOLVABLE:
            continue
    return hints


@functools.cache
def settings_class(factory: Callable[..., Any], name: str | None = None) -> type:
    """A dataclass whose fields are ``factory``'s keyword-capable parameters (type from its annotation, default from
    its signature, else required), so that the settings of a plugin class are read by :func:`from_dict` like any
    config section. Raises TypeError or ValueError where ``factory`` has no introspectable signature."""
    hints = _parameter_hints(factory)
    fields: list[tuple[str, Any, Any]] = []
    for p in inspect.signature(factory).parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        tp = hints.get(p.name, Any)
        if p.default is p.empty:
            fields.append((p.name, tp, dataclasses.field()))
            continue
        if p.default is None:
            tp = typing.Optional[tp]  # `x: int = None` still means "an int, or none given"
        fields.append((p.name, tp, dataclasses.field(default_factory=lambda d=p.default: d)))
    return dataclasses.make_dataclass(name or getattr(factory, "__name__", "Settings"), fields, kw_only=True)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping at the top level")
    return data


def load_yaml_list(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    data = yaml.safe_load(path.read_text()) or []
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"{path} must hold a YAML list of mappings")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` -> ``("section.key", value)``, the value read as YAML (``3`` is an int, ``[0, 1]`` a
    list, ``null`` None)."""
    dotted, sep, raw = item.partition("=")
    if not sep or not dotted:
        raise ValueError(f"override {item!r} must look like section.key=value, e.g. trainer.max_steps=10")
    return dotted, yaml.safe_load(raw)


def format_override(key: str, value: Any) -> str:
    """The ``key=value`` item that :func:`parse_override` reads back as ``(key, value)`` (strings quoted where YAML
    would read them as something else)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
    text = text.removesuffix("...\n").strip()  # a lone scalar is dumped as a document ending in "..."
    return f"{key}={text}"


def apply_overrides(data: dict[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in ``data`` in order, making missing sections; ``data`` is changed and returned."""
    for dotted, value in overrides:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted}: {key!r} is not a section")
        node[leaf] = value
    return data


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
