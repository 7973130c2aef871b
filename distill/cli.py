"""Command-line pieces shared by every `python -m distill.*` tool, so that the same thing is spelled
and parsed the same way everywhere: `--reader-option K=V`, `--teacher-option K=V`, comma lists, and
what a user's mistake looks like (`error: ...`, exit status 2)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any, ParamSpec

import yaml

from distill.errors import DistillError

_P = ParamSpec("_P")
USER_ERROR_EXIT = 2  # what argparse exits with for a bad command line, too


def reports_user_errors(main: Callable[_P, int]) -> Callable[_P, int]:
    """Decorate a CLI's `main`: a DistillError (bad input or config, the user's to fix; its message
    names the file or setting and the fix) prints `error: <message>` on stderr and returns exit
    status 2 instead of a traceback. Any other exception is a bug and keeps its traceback."""

    @functools.wraps(main)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except DistillError as err:
            print(f"error: {err}", file=sys.stderr)
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


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept `old` (hidden from --help) as the former spelling of the option `new`, for one release:
    it sets the same value and prints a warning naming `new`."""

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated and goes in the next release; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    parser.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=Alias, help=argparse.SUPPRESS)


def comma_list(text: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"] (empty parts dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]
