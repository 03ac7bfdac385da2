"""The two kinds of input type: `jets` and `global` are one row per jet; every other input type
(tracks, flows, electrons, ...) is an object type, a sequence of objects per jet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

JET_INPUTS: tuple[str, ...] = ("jets", "global")


def is_object_type(input_type: str) -> bool:
    """Tracks, flows, electrons...: a sequence of objects per jet (not jets or global)."""
    return input_type not in JET_INPUTS


def object_types(variables: Mapping[str, Sequence[str] | None]) -> list[str]:
    """The object types of a variable map that list variables, in its order."""
    return [t for t, names in variables.items() if is_object_type(t) and names]
