"""Bad input as one line: the error the ``lit-dar`` command reports without a traceback, and jsonargparse's
reports shortened to what was wrong and what is allowed."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class UsageError(ValueError):
    """A bad request from the command line or a recipe: printed as one line, no traceback."""


def check_config_files(argv: list[str]) -> None:
    """Refuse an empty ``--config`` file (jsonargparse would report only "Unexpected config")."""
    for flag, path in zip(argv, argv[1:]):
        if flag == "--config" and Path(path).is_file() and not Path(path).read_text().strip():
            raise UsageError(f"The config file {path!r} is empty: write a recipe there (see recipes/), or drop --config.")


def explain(message: str, command: str, function: Any = None) -> str:
    """jsonargparse's report on ``command`` (whose function is ``function``), shortened to what was wrong and what
    is allowed."""
    own = re.search(r"(DARConfig\.\S+=.*?)(?: Given value type:|$)", message)
    if own:  # jsonargparse wraps our own validation message in its Union report: show just ours
        return own.group(1)
    key = re.search(r'Parser key "([^"]+)"', message)
    hint = f" (see `lit-dar {command} --help` for the accepted keys and values)"
    if key is None or not callable(function):
        return message + hint
    key = key.group(1)
    annotation = _annotation(function, key)
    unknown = re.search(r"Unrecognized arguments: --?([\w.]+)", message) or re.search(
        r"Key '([\w.]+)' is not expected", message)
    dataclass = next((t for t in _union(annotation) if hasattr(t, "__dataclass_fields__")), None)
    if unknown and dataclass is not None:
        allowed = [f.name for f in fields(dataclass) if f.init]
        return f"Unknown key '{key}.{unknown.group(1)}': the keys of {key} are {allowed}."
    choices = [c for t in _union(annotation) if get_origin(t) is Literal for c in get_args(t)]
    given = re.search(r"Given value: (.*?)$", message)
    if choices and given:
        null = " or null" if type(None) in _union(annotation) else ""
        return f"{key}={given.group(1).strip()!r} is not allowed: choose one of {choices}{null}."
    return message + hint


def _annotation(function: Any, key: str) -> Any:
    try:
        return get_type_hints(function).get(key.split(".")[0])
    except Exception:  # an annotation that cannot be resolved only costs the shorter message
        return None


def _union(annotation: Any) -> tuple[Any, ...]:
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
