"""Command-line pieces shared by every `python -m distill.*` tool, so that the same thing is spelled
and parsed the same way everywhere: `--reader-option K=V`, `--teacher-option K=V`, comma lists, views,
deprecated aliases, the `None` a W&B agent writes for null, and what a user's mistake looks like
(`error: ...`, exit status 2)."""

from __future__ import annotations

import argparse
import ast
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec

import yaml

from distill.errors import DistillError

_P = ParamSpec("_P")
USER_ERROR_EXIT = 2  # what argparse exits with for a bad command line, too


def reports_user_errors(main: Callable[_P, int]) -> Callable[_P, int]:
    """Decorate a CLI's `main`: a DistillError (bad input or config, the user's to fix; its message
    names the file or setting and the fix) or a PermissionError (a file or folder this user may not
    read or write) prints `error: <message>` on stderr and returns exit status 2 instead of a
    traceback. Any other exception is a bug and keeps its traceback."""

    @functools.wraps(main)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except DistillError as err:
            print(f"error: {err}", file=sys.stderr)
        except PermissionError as err:
            print(
                f"error: {err.filename or err}: permission denied; check the owner and mode of that "
                "file or its folder, or point the command at a place you may write",
                file=sys.stderr,
            )
        return USER_ERROR_EXIT

    return run


def key_value(text: str) -> tuple[str, Any]:
    """`K=V` -> (K, V read as YAML): `sigmas=[1,2]` a list, `line_width=5` an int, `x=abc` a string,
    `categories=["artery", "vein"]` (JSON is YAML) a list, `x=null` None."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML ({err})") from err


def views_flag(text: str) -> list[str]:
    """`--views d4` / `--views identity,hflip` -> checked view names (distill.views; `d4` = all 8)."""
    from distill.views import expand_views

    try:
        return expand_views(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def optional_path(text: str) -> Path | None:
    """A path flag that may be set to nothing: `None` (what a W&B agent writes for null) and `null` give
    None, as `--key=None` does in `distill.fit` (`none_as_null`), not a folder named "None"."""
    return None if text in ("None", "null") else Path(text)


def probability(text: str) -> float:
    """A `--threshold` flag: a probability in [0, 1] (masks are prob >= threshold, so 5 leaves every
    mask empty and -1 fills it)."""
    value = float(text)  # a ValueError: argparse says "invalid probability value"
    if not 0 <= value <= 1:  # NaN too
        raise argparse.ArgumentTypeError(f"{text}: a threshold is a probability; give one in [0, 1]")
    return value


def comma_list(text: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"] (empty parts dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def add_deprecated_alias(parser: argparse.ArgumentParser, alias: str, target: argparse.Action) -> None:
    """Accept `alias`, an old spelling of the option `target`, for one more release.

    The alias is hidden from --help, does exactly what `target` does, and prints a one-line note on
    stderr naming the new spelling. `target` must not be `required` (argparse would not count the
    alias as giving it); check for a missing value after parsing instead.
    """
    new = target.option_strings[0]

    class Alias(argparse.Action):
        def __call__(
            self,
            parser: argparse.ArgumentParser,
            namespace: argparse.Namespace,
            values: Any,
            option_string: str | None = None,
        ) -> None:
            note = f"note: {option_string} is deprecated, use {new} (the old name goes in the next release)"
            print(note, file=sys.stderr)
            target(parser, namespace, values, new)

    parser.add_argument(
        alias, action=Alias, dest=target.dest, type=target.type, choices=target.choices,
        metavar=target.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
    )  # fmt: skip


def none_as_null(argv: Sequence[str]) -> list[str]:
    """`--key=None` -> `--key=null` (also `--key None`, and a None inside a Python mapping or list).

    A W&B agent (and `distill.sweep`, which builds trials the same way) writes each swept value with
    Python's str(), so a null arrives as `--data.crop_size=None`, and a mapping holding one as
    `--model.student={'name': 'unet', 'encoder_weights': None}`. jsonargparse reads values as YAML,
    where `None` is the string "None": a type error for an int, a folder named "None" for a path.
    Every other argument is left as it is; a quoted 'None' stays a string.
    """
    out = []
    for position, arg in enumerate(argv):
        key, sep, value = arg.partition("=")
        after_flag = position > 0 and argv[position - 1].startswith("--") and "=" not in argv[position - 1]
        if arg.startswith("--") and sep:
            out.append(f"{key}={_python_none_as_null(value)}")
        elif after_flag and arg == "None":
            out.append("null")
        else:
            out.append(arg)
    return out


def _python_none_as_null(value: str) -> str:
    if value.strip() == "None":
        return "null"
    if "None" not in value:
        return value
    try:
        parsed = ast.literal_eval(value)
        return json.dumps(parsed) if isinstance(parsed, (dict, list, tuple)) else value
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return value  # not a Python literal: YAML reads it as it is
