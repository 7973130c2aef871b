"""Errors (and warnings) a user can act on: each names the file (or setting) at fault and, where known, the fix."""

from __future__ import annotations

from pathlib import Path


class DistillError(Exception):
    """Base class for every error vessel-distill raises on purpose (bad input, bad config)."""


class DatasetError(DistillError):
    """A dataset item or index file is unusable.

    `path` is the file at fault, `problem` says what is wrong, `fix` (optional) says what to do.
    """

    def __init__(self, path: str | Path, problem: str, fix: str | None = None):
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        message = f"{self.path}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)

    def __reduce__(self):  # pickles with its fields, so it survives a trip from a worker process
        return type(self), (self.path, self.problem, self.fix)


class CacheError(DistillError):
    """A teacher cache is missing, corrupt, or does not match the dataset/teacher it is used with."""


class ConfigError(DistillError):
    """A configuration value (CLI flag, YAML key) is invalid; the message names the setting."""


class DatasetWarning(UserWarning):
    """Something in a dataset was fixed up or left out; the message says what and where."""
