"""Command-line pieces shared by every `python -m distill.*` tool, so that the same thing is spelled
and parsed the same way everywhere: `--reader-option K=V`, `--teacher-option K=V`, comma lists, views."""

from __future__ import annotations

import argparse
from typing import Any

import yaml


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


def comma_list(text: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"] (empty parts dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]
