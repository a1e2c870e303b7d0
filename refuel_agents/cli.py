"""Command-line flags from a config dataclass (one flag per field, its docstring as the help), ``--config FILE``
(YAML or JSON; explicit flags override it) and the output-folder check every command makes before any work."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import tempfile
import textwrap
import types
import typing
from pathlib import Path
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
            parse = json_object_or_null if nullable else json_object
            parser.add_argument(flag, type=parse, default=default, metavar="JSON", help=help_text)
        else:
            parse = base if base in (int, float, str) else str
            parser.add_argument(flag, type=_none_or(parse) if nullable else parse, default=default, help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: _as_field(getattr(args, f.name)) for f in dataclasses.fields(cls)})


def _as_field(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def json_object(text: str) -> dict:
    """A JSON object flag: a clear error (the value, what to pass) for anything else."""
    example = '\'{"max_turns": 3}\''
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({err}); pass a JSON object such as {example}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is JSON but not an object; pass a JSON object such as {example}")
    return value


def json_object_or_null(text: str) -> dict | None:
    return None if text.strip().lower() in ("none", "null", "") else json_object(text)



def check_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> None:
    """Refuse an output folder that cannot be written (a file, a read-only folder) before any work is done.

    Nothing is created: the nearest existing folder of ``path`` is probed with a temporary file.
    """
    path = Path(path)
    existing = path.absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path.absolute() else f"is under {existing}, a file"
        raise ValueError(f"{flag} {path}: {where}, not a folder; pass a folder (created if missing)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".refuel-write-probe-", dir=existing)
    except OSError as err:
        raise ValueError(f"{flag} {path}: {existing} cannot be written ({err.strerror}); pass a folder you can "
                         "write to") from None
    os.close(fd)
    os.unlink(probe)


class StrictParser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`ValueError` instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def load_config_file(path: str) -> dict[str, Any]:
    """A ``--config`` file: YAML or JSON, a mapping from flag names (``lr``, ``env_kwargs`` or ``env-kwargs``)
    to values."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as err:
        raise ValueError(f"--config {path}: cannot be read ({err.strerror}); pass a YAML or JSON file") from None
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise ValueError(f"--config {path}: not valid {'JSON' if file.suffix.lower() == '.json' else 'YAML'} "
                         f"({err})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: holds a {type(values).__name__}; pass a mapping of flag names to values, "
                         "e.g. 'lr: 2.0e-6'")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def config_file_argv(path: str, values: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """The flags a ``--config`` file's ``values`` stand for, to be placed before the explicit ones (which
    then win). Every key must be a flag of ``parser``; values go through the flags' own parsing."""
    actions = {o: a for a in parser._actions for o in a.option_strings}
    argv: list[str] = []
    unknown = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None or flag in ("--config", "--help"):
            unknown.append(str(key))
            continue
        argv += _flag_tokens(flag, action, value)
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {unknown}; the keys are the flags of --help without their "
                         "dashes (lr, env_kwargs, ...)")
    return argv


def _flag_tokens(flag: str, action: argparse.Action, value: Any) -> list[str]:
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(action, argparse._StoreTrueAction):
        return [flag] if value else []
    if isinstance(action, argparse._AppendAction):
        return [t for v in (value if isinstance(value, list) else [value]) for t in (flag, _token(v))]
    if isinstance(value, list | tuple) and action.nargs not in (None, "?"):
        return [flag, *map(_token, value)]
    return [flag, _token(value)]


def _token(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the ``--config`` file, the other arguments)."""
    rest, path, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a file: --config FILE (YAML or JSON)")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return path, rest
