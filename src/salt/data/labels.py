"""How a label becomes class indices: the spec the model config gives the data layer, and the
one mapping (`class_indices`) that training (`salt.data.ftag`) and evaluation both apply.

Kept apart from the HDF5 reader (`salt.data.ftag`), so the model layer, which says what it
needs, does not import h5py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class LabelSpec:
    """How a label variable becomes class indices.

    ``label_map`` maps values in the file to class indices (a target of -1 means "ignored by the
    loss"); any other value in the file is an error. Without a map, values must lie in
    ``[0, num_classes)`` or be -1 (ignored by the loss) when ``num_classes`` is known; without
    either (vertexing) values are passed on as integers. ``continuous`` (regression targets)
    passes them on as float32, padded slots and missing targets NaN (ignored by the loss).
    ``task`` only names the task in messages.
    """

    label_map: Mapping[int, int] | None = None
    num_classes: int | None = None
    task: str | None = field(default=None, compare=False)
    continuous: bool = False

    @cached_property
    def _lookup(self) -> tuple[np.ndarray, int] | None:
        """The label_map as a table: ``table[value - offset]`` is the class, -2 "not a key"."""
        if not self.label_map:
            return None
        keys = np.array(sorted(self.label_map), dtype=np.int64)
        offset = int(keys.min())
        table = np.full(int(keys.max()) - offset + 1, -2, dtype=np.int64)
        for k, v in self.label_map.items():
            table[int(k) - offset] = int(v)
        return table, offset


def class_indices(values: np.ndarray, spec: LabelSpec) -> tuple[np.ndarray, np.ndarray]:
    """Class indices (int64) of integer label values, and a mask of the values with no class.

    With a label_map: the map's targets (-1: ignored by the loss); a value that is not a key has
    no class. Without one: the values themselves; with ``num_classes`` a value outside
    ``[-1, num_classes)`` has no class. Without either every value is passed on. A value with
    no class becomes -1: the training reader refuses it (naming the file, variable and
    values), the evaluation counts the jet in no class (a test file may hold flavours the
    model has no class for).
    """
    ints = np.asarray(values).astype(np.int64, copy=False)
    lookup = spec._lookup
    if lookup is not None:
        table, offset = lookup
        idx = ints - offset
        inside = (idx >= 0) & (idx < len(table))
        mapped = np.full(ints.shape, -1, dtype=np.int64)
        mapped[inside] = table[idx[inside]]
        unknown = ~inside | (mapped == -2)
        mapped[unknown] = -1
        return mapped, unknown
    if spec.num_classes is None:
        return ints, np.zeros(ints.shape, dtype=bool)
    unknown = (ints < -1) | (ints >= spec.num_classes)
    return np.where(unknown, -1, ints), unknown


LabelsConfig = Mapping[str, Mapping[str, LabelSpec | Mapping[int, int] | None]]
