"""Domain exceptions.

Every error a user can cause is one of these; the CLI maps them to a one-line
message and an exit code in one table (``cli/app.py``), so no command prints a
traceback for bad input.
"""
from __future__ import annotations

from pathlib import Path


class WiseError(Exception):
    """Base class: a user-facing problem with a one-line message and an optional hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class InputError(WiseError):
    """A bad edits / prompts / config file.  The message names file, line and field."""

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = str(path)
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}", hint)
        self.path, self.line, self.field = str(path), line, field


class ConfigError(WiseError):
    """An invalid hyper-parameter (unknown key, wrong type, out of range)."""


class ModelError(WiseError):
    """A model path that is missing, not a model, or of an unsupported architecture."""


class CheckpointError(WiseError):
    """A patched checkpoint that is incomplete, tampered with, or whose base does not match."""


class TrainingDiverged(WiseError):
    """An edit run whose optimisation went to NaN/Inf: nothing is written."""


class DeviceError(WiseError):
    """A device or dtype that this machine cannot provide."""


class OutputExistsError(WiseError):
    """The output path exists and --force was not given."""


class GateFailed(WiseError):
    """An eval figure fell short of a --min-* gate (exit 3, for CI)."""

    exit_code = 3
