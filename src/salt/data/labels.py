"""How the loader reads a label: the spec the model config gives the data layer.

Kept apart from the HDF5 reader (`salt.data.ftag`), so the model layer, which says what it
needs, does not import h5py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


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


LabelsConfig = Mapping[str, Mapping[str, LabelSpec | Mapping[int, int] | None]]
