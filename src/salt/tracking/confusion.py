"""The jet confusion matrix as every logger records it.

``counts[t][p]`` is the number of validation jets of truth class ``t`` whose highest score is
class ``p``, in the order of the flavour task's ``class_names``. The fractions are the counts
normalised per truth class (each row sums to 1), the form a physicist reads: of the true
c-jets, how many were called b. A class without validation jets has a row of NaN (written as
``null`` in JSON, left blank in the plot): "no jets" is not "0% correct".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any


def checked_counts(counts: Sequence[Sequence[Any]], class_names: Sequence[str]) -> list[list[int]]:
    """``counts`` as a square list of non-negative ints, one row and column per class."""
    n = len(class_names)
    rows = [list(row) for row in counts]
    if n < 2 or len(rows) != n or any(len(row) != n for row in rows):
        shape = f"{len(rows)}x{'/'.join(str(len(r)) for r in rows) or 0}"
        raise ValueError(
            f"confusion matrix: expected {n}x{n} counts for the classes {list(class_names)}, "
            f"got {shape}"
        )
    out = [[round(float(v)) for v in row] for row in rows]
    if any(v < 0 for row in out for v in row):
        raise ValueError(f"confusion matrix: negative count in {out}")
    return out


def row_fractions(counts: Sequence[Sequence[int]]) -> list[list[float]]:
    """Each row divided by its sum; NaN for a class without jets."""
    fractions = []
    for row in counts:
        total = sum(row)
        fractions.append([v / total if total else math.nan for v in row])
    return fractions


def as_record(
    counts: Sequence[Sequence[int]],
    class_names: Sequence[str],
    step: int,
    epoch: int | None,
) -> dict[str, Any]:
    """A JSON-ready record: step, epoch, classes, counts and row fractions (NaN as None)."""
    return {
        "step": int(step),
        "epoch": None if epoch is None else int(epoch),
        "class_names": list(class_names),
        "counts": [list(row) for row in counts],
        "fractions": [
            [round(v, 6) if math.isfinite(v) else None for v in row]
            for row in row_fractions(counts)
        ],
    }


def record_json(record: dict[str, Any]) -> str:
    """`as_record`'s record as JSON with one matrix row per line, as a person reads it."""
    items = []
    for key, value in record.items():
        if key in ("counts", "fractions"):
            text = "[\n    " + ",\n    ".join(json.dumps(row) for row in value) + "\n  ]"
        else:
            text = json.dumps(value)
        items.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(items) + "\n}\n"
