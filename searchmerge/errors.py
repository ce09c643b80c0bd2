"""Errors searchmerge raises for caller mistakes: each names what is wrong, where, and how to fix it.

One hierarchy, one exit code each: bad input (a recipe, a spec, a checkpoint, an output location) exits 2;
a failure while running (an actor died, a zoo cannot be built here) exits 1. The CLI prints ``str(exc)``
as one line (``searchmerge: error: <where>: <what> — <how to fix>``), so messages are written that way.
"""

from __future__ import annotations

from dataclasses import dataclass


class SearchmergeError(Exception):
    """Base class of searchmerge's own errors; ``exit_code`` is 2 for bad input, 1 for runtime failures."""

    @property
    def exit_code(self) -> int:
        return 1 if isinstance(self, RuntimeError) else 2


class RecipeError(SearchmergeError, ValueError):
    """A recipe (method, parameters, models) is invalid."""

    def __init__(self, message: str, *, loc: tuple[str | int, ...] | None = None) -> None:
        super().__init__(message)
        self.loc = loc  # where in the recipe document (for file:line:col), when known


class CheckpointError(SearchmergeError, ValueError):
    """A checkpoint is missing, unsafe to load, or does not match the others."""


class NonFiniteError(CheckpointError):
    """A tensor a merge reads (or writes) holds NaN or ±Inf."""


class OutputError(SearchmergeError, ValueError):
    """An output location cannot be written (exists, not writable, no space, lost a race)."""


class YamlError(SearchmergeError, ValueError):
    """A YAML file is not plain, valid YAML (syntax, tags, duplicate keys, not a mapping)."""


@dataclass(frozen=True)
class Position:
    """A place in a source file, printed as ``file:line:col`` (1-based)."""

    file: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}:{self.column or 1}"


def message(what: str, fix: str = "", where: Position | str | None = None) -> str:
    """``<where>: <what> — <fix>``: the one-line shape of every error message."""
    text = what if not fix else f"{what} — {fix}"
    return f"{where}: {text}" if where else text


class UsageError(SearchmergeError, ValueError):
    """A command-line value is invalid (an unknown method name, a bad list)."""
