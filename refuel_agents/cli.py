"""Command-line flags from a config dataclass: one flag per field, its docstring as the help."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each field of a dataclass (its documentation).

    Fields inherited from dataclass bases keep their base's text unless the subclass redeclares them.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return annotation, False


def _none_or(parse):
    def convert(text: str):
        return None if text.lower() in ("none", "null", "") else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any) -> None:
    """Add ``--field-name`` for every field of ``cls``, defaulting to ``defaults``' values."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, nullable = _base_type(hints[f.name])
        default = getattr(defaults, f.name)
        help_text = docs.get(f.name, "") + " (default: %(default)s)"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(base) is tuple:
            item = typing.get_args(base)[0]
            parser.add_argument(flag, type=item, nargs=len(typing.get_args(base)), default=default, help=help_text)
        elif typing.get_origin(base) is dict or base is dict:
            parser.add_argument(flag, type=json.loads, default=default, metavar="JSON", help=help_text)
        else:
            parse = base if base in (int, float, str) else str
            parser.add_argument(flag, type=_none_or(parse) if nullable else parse, default=default, help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: _as_field(getattr(args, f.name)) for f in dataclasses.fields(cls)})


def _as_field(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
