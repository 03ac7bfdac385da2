"""Selections on object variables (``data.selections``): objects failing a cut are dropped.

A cut is ``"<variable> <op> <number>"`` with op one of ``< <= > >= == !=`` (the strings of
atlas-ftag-tools' ``Cuts`` and the old tool's ``selections``), e.g. ``"d0 < 3.5"``. Cuts are
applied to the raw stored values, before normalisation; an object failing any cut of its type
is marked padded, as if it had not been stored.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from salt.errors import ConfigError
from salt.utils.input_types import is_object_type

OPERATORS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_CUT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Cut:
    variable: str
    op: str
    value: float
    text: str

    def passes(self, values: np.ndarray) -> np.ndarray:
        return OPERATORS[self.op](values, self.value)


def parse_cut(text: str, where: str) -> Cut:
    """``"d0 < 3.5"`` -> a Cut; one ConfigError naming ``where`` for anything else."""
    match = _CUT.match(str(text))
    value = None
    if match:
        try:
            value = float(match.group(3))
        except ValueError:
            value = None
    if match is None or value is None:
        raise ConfigError(
            f"{where}: {text!r} is not a cut '<variable> <op> <number>' with op one of "
            f"{' '.join(OPERATORS)} (e.g. 'd0 < 3.5')"
        )
    return Cut(match.group(1), match.group(2), value, str(text).strip())


def parse_selections(
    selections: Mapping[str, Sequence[str]] | None, where: str = "data.selections"
) -> dict[str, list[Cut]]:
    """``{object type: [cut, ...]}`` parsed; jet-level types take no selection."""
    out: dict[str, list[Cut]] = {}
    for input_type, cuts in (selections or {}).items():
        if not is_object_type(input_type):
            raise ConfigError(
                f"{where}.{input_type}: selections drop objects of a jet (tracks, flows, ...); "
                "a jet-level selection is the job of the sample's preprocessing"
            )
        out[input_type] = [parse_cut(c, f"{where}.{input_type}") for c in cuts]
    return out
