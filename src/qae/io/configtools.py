"""Dataclass config trees: YAML presets, dotted overrides and argparse flags for every field.

A config is a tree of dataclasses whose fields carry their help text in
``field(metadata={"help": ...})`` (use :func:`option`). Every leaf becomes a command-line
flag ``--section.name VALUE``; YAML files and ``section.name=value`` overrides use the same
dotted names. Unknown names and values of the wrong type raise ``ValueError`` naming the
field, the value and what was expected.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from qae.io.atomic import atomic_write_text

__all__ = [
    "add_config_arguments",
    "field_docs",
    "field_help",
    "validate",
    "apply_overrides",
    "config_from_args",
    "config_to_dict",
    "iter_leaves",
    "load_yaml_config",
    "option",
    "save_yaml_config",
]

_NONE_WORDS = {"none", "null", "~"}


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, **kwargs) -> Any:
    """A dataclass field with help text (and optional choices) for the CLI and docs."""
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def field_help(cls: type, f: dataclasses.Field) -> str:
    """Help text of a field: ``option(help=...)`` or its attribute docstring."""
    return f.metadata.get("help") or field_docs(cls).get(f.name, "")


def iter_leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, type]]:
    """Yield (dotted name, field, resolved type, owner class) for every leaf of a tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_leaves(tp, name + ".")
        else:
            yield name, f, tp, cls


def _split_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _split_optional(tp)
    origin = typing.get_origin(base)
    name = f"list of {typing.get_args(base)[0].__name__}" if origin is list else base.__name__
    return f"{name} or none" if optional else name


def coerce(name: str, value: Any, tp: Any, choices: tuple | None = None) -> Any:
    """Convert ``value`` (from YAML or a command line string) to the field's type."""
    base, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if optional:
            return None
        raise ValueError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    try:
        if base is bool:
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                out = True
            elif isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                out = False
            else:
                raise ValueError
        elif typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            out = [coerce(name, v, item) for v in value]
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        elif base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            out = str(value)
        else:
            raise TypeError(f"{name}: unsupported config type {tp!r}")
    except (ValueError, TypeError) as err:
        if isinstance(err, TypeError) and "unsupported" in str(err):
            raise
        raise ValueError(f"{name}: expected {_type_name(tp)}, got {value!r}") from None
    if choices and out not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, choices))}, got {out!r}")
    return out


def _set_path(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    obj = cfg
    for p in parts[:-1]:
        obj = getattr(obj, p)
    setattr(obj, parts[-1], value)


def apply_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """Set dotted fields (``{"algo.k": 0.6}``) on a config tree in place, with type checks."""
    leaves = {name: (f, tp) for name, f, tp, _ in iter_leaves(type(cfg))}
    for dotted, value in overrides.items():
        if dotted not in leaves:
            raise ValueError(f"unknown config field {dotted!r}; known: {', '.join(sorted(leaves))}")
        f, tp = leaves[dotted]
        _set_path(cfg, dotted, coerce(dotted, value, tp, f.metadata.get("choices")))
    validate(cfg)
    return cfg


def validate(cfg: Any, prefix: str = "") -> None:
    """Re-run every section's ``__post_init__`` checks; errors name the dotted section."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
    post = getattr(cfg, "__post_init__", None)
    if post is not None:
        try:
            post()
        except ValueError as err:
            section = prefix.rstrip(".") or type(cfg).__name__
            raise ValueError(f"{section}: {err}") from None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what a YAML parse error is, in one line (``line 3, column 5: ...``)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    return where + " ".join(str(problem).split())


def load_yaml_config(cls: type, path: str | os.PathLike, base: Any = None) -> Any:
    """Build ``cls()`` (or update ``base``) from a YAML file of nested sections."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except UnicodeDecodeError as err:
        raise ValueError(
            f"config file {str(path)!r} is not UTF-8 text (byte {err.start})"
        ) from None
    except yaml.YAMLError as err:
        raise ValueError(
            f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}"
        ) from None
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {kind}")
    cfg = base if base is not None else cls()
    return apply_overrides(cfg, _flatten(data))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config tree."""
    return dataclasses.asdict(cfg)


def save_yaml_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the config as YAML atomically (temp file + rename)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, aliases: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Add one ``--section.name`` flag per leaf, help text and default included.

    ``aliases`` maps a dotted name to extra short flags (``{"algo.estimator": ["--estimator"]}``).
    """
    aliases = aliases or {}
    defaults = cls()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f, tp, owner in iter_leaves(cls):
        section = name.rsplit(".", 1)[0] if "." in name else "general"
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options")
        value = defaults
        for part in name.split("."):
            value = getattr(value, part)
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        choices = f.metadata.get("choices")
        extra = f" (choices: {', '.join(map(str, choices))})" if choices else ""
        groups[section].add_argument(
            f"--{name}",
            *aliases.get(name, ()),
            dest=f"cfg:{name}",
            default=argparse.SUPPRESS,
            metavar=_type_name(tp).upper().replace(" ", "_"),
            help=f"{field_help(owner, f)}{extra} [default: {shown}]".replace("%", "%%"),
        )


def config_from_args(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """Apply the ``--section.name`` flags present in ``args`` to ``base`` (or ``cls()``)."""
    cfg = base if base is not None else cls()
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    return apply_overrides(cfg, overrides)
