"""Class names from the training file: FTAG preprocessing stores the names of a label's classes
as an attribute of its dataset (``jets.attrs["flavour_label"] = ["bjets", "cjets", ...]``).

A classification task without ``class_names`` takes them from there; a task that lists them
must give each class index the file's name for it (ftag's flavour names and the short ones
agree: ``b`` is ``bjets``; either list may be longer), or its outputs would carry the wrong
names. Tasks with a
``label_map`` name their own classes: the file's attribute names the stored values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from salt.data.ftag import dataset_of, open_h5
from salt.errors import ConfigError
from salt.utils.flavours import canonical_name

log = logging.getLogger("salt")


def file_class_names(path: Path, dataset: str, label: str) -> list[str] | None:
    """The class names a file stores for ``label`` of ``dataset``, or None."""
    with open_h5(path) as f:
        if dataset not in f or label not in f[dataset].attrs:
            return None
        names = f[dataset].attrs[label]
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except TypeError:  # a scalar attribute: not a list of names
        return None


def _disagree(given: list[str], stored: list[str]) -> bool:
    """Whether a class index names another class in the config than in the file (one list may
    be longer: a file without taus, a model without a tau class)."""
    return any(canonical_name(a) != canonical_name(b) for a, b in zip(given, stored, strict=False))


def fill_class_names(tasks: Mapping[str, Any], train_file: Path, input_map: Mapping[str, str]):
    """Give classification tasks without class_names the file's, and check the others."""
    for name, task in tasks.items():
        if str(task.type) != "classification" or task.label_map is not None:
            continue
        dataset = dataset_of(input_map, task.input)
        stored = file_class_names(train_file, dataset, task.label)
        key = f"model.tasks.{name}.class_names"
        if task.class_names is None:
            if stored is None:
                raise ConfigError(
                    f"{key} is not set and {train_file} stores no class names for "
                    f"'{dataset}' label '{task.label}' (a dataset attribute); list the classes"
                )
            task.class_names = stored
            log.info("salt: %s from %s: %s", key, train_file, stored)
        elif stored is not None and _disagree(task.class_names, stored):
            raise ConfigError(
                f"{key}={list(task.class_names)} disagrees with {train_file}, whose "
                f"'{dataset}' label '{task.label}' has the classes {stored} (in that order); "
                f"list them in the file's order, or leave {key} out to take them from the file"
            )
