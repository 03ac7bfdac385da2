"""The "closest valid names" hint of every unknown-name error (config keys, groups, variables)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


def closest(word: str, candidates: Sequence[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` candidates close to ``word`` (ignoring case), closest first."""
    lower = {c.lower(): c for c in candidates}
    return [lower[c] for c in difflib.get_close_matches(word.lower(), list(lower), n, cutoff)]


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """``; did you mean X?``, or the end of the sentence when nothing is close."""
    best = closest(word, candidates)
    return f"; did you mean {best[0]}?" if best else "."


def closest_available(name: str, options: Sequence[str]) -> str:
    """`` Closest available: a, b.`` (up to three), or nothing when none is close."""
    close = closest(name, options, n=3, cutoff=0.5)
    return f" Closest available: {', '.join(close)}." if close else ""
