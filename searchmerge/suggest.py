"""Typo suggestions ("did you mean …") for names a user types: methods, parameters, spec fields, rows."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest(word: str, options: Iterable[str]) -> str | None:
    """The option closest to ``word`` (difflib ratio ≥ 0.6, case-insensitive), or ``None``."""
    opts = list(dict.fromkeys(str(o) for o in options))
    lowered = {o.lower(): o for o in opts}
    hit = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hit[0]] if hit else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` did you mean `x`?`` (with a leading space) or ``""``: appended to an error's fix."""
    hit = closest(word, options)
    return f"did you mean `{hit}`?" if hit else ""


def unknown(kind: str, word: str, options: Iterable[str]) -> tuple[str, str]:
    """(what, fix) for an unknown name: the fix suggests the closest valid one, then lists them all."""
    opts = sorted(dict.fromkeys(str(o) for o in options))
    hint = did_you_mean(word, opts)
    listing = f"valid: {', '.join(opts)}"
    return f"unknown {kind} `{word}`", f"{hint} ({listing})" if hint else listing
