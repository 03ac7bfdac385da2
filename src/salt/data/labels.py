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
    passes them on as float32, padded slots and missing targets NaN (ignored by the loss);
    ``weight`` (a task's per-jet ``sample_weight``, continuous) refuses a value that is not a
    finite number >= 0. ``truth=False`` marks a variable read beside the truth, not truth itself
    (a regression target's denominator, a sample weight): it may also be a model input. ``task``
    only names the task in messages.
    """

    label_map: Mapping[int, int] | None = None
    num_classes: int | None = None
    task: str | None = field(default=None, compare=False)
    continuous: bool = False
    weight: bool = False
    truth: bool = True

    @cached_property
    def _lookup(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The label_map as sorted keys and their classes: memory and time grow with the number
        of keys, never with their range (a PDG ID such as 1000010020 or -11 is one entry)."""
        if not self.label_map:
            return None
        items = sorted((int(k), int(v)) for k, v in self.label_map.items())
        keys = np.array([k for k, _ in items], dtype=np.int64)
        classes = np.array([v for _, v in items], dtype=np.int64)
        return keys, classes


def class_indices(values: np.ndarray, spec: LabelSpec) -> tuple[np.ndarray, np.ndarray]:
    """Class indices (int64) of integer label values, and a mask of the values with no class.

    With a label_map: the map's targets (-1: ignored by the loss); a value that is not a key has
    no class. Without one: the values themselves; with ``num_classes`` a value outside
    ``[-1, num_classes)`` has no class. Without either every value is passed on. A NaN or a
    fraction (a float label) has no class either. A value with no class becomes -1: the
    training reader refuses it (naming the file, variable and values), the evaluation counts
    the jet in no class (a test file may hold flavours the model has no class for).
    """
    values = np.asarray(values)
    # a NaN or a fraction stored as float is no integer label: no class (not a truncation)
    broken = (
        ~np.isfinite(values) | (values != np.trunc(values))
        if values.dtype.kind == "f"
        else np.zeros(values.shape, dtype=bool)
    )
    ints = np.where(broken, 0, values).astype(np.int64, copy=False)
    lookup = spec._lookup
    if lookup is not None:
        keys, classes = lookup
        # binary search over the sorted keys: O(values x log(keys)), no table over their range
        pos = np.searchsorted(keys, ints).clip(max=len(keys) - 1)
        known = (keys[pos] == ints) & ~broken
        return np.where(known, classes[pos], -1), ~known
    if spec.num_classes is None:
        return np.where(broken, -1, ints), broken
    unknown = (ints < -1) | (ints >= spec.num_classes) | broken
    return np.where(unknown, -1, ints), unknown


LabelsConfig = Mapping[str, Mapping[str, LabelSpec | Mapping[int, int] | None]]
