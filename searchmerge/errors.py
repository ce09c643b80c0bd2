"""Errors searchmerge raises for caller mistakes: each names what is wrong and where."""

from __future__ import annotations


class SearchmergeError(Exception):
    """Base class of searchmerge's own errors."""


class RecipeError(SearchmergeError, ValueError):
    """A recipe (method, parameters, models) is invalid."""


class CheckpointError(SearchmergeError, ValueError):
    """A checkpoint is missing, unsafe to load, or does not match the others."""
