"""What a run reports: the rejections at 70% b-jet efficiency on the validation jets, the line
printed for each epoch and the summary at its end (the metric it monitors:
salt.training.monitor)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from salt.training.distributed import all_gather_object

if TYPE_CHECKING:
    from salt.training.state import Run


REJECTION_WP = 70  # % b-jet efficiency of the rejections logged per epoch


def rejections_at(
    class_names: list[str], scores: list[Tensor], classes: list[Tensor]
) -> dict[str, float]:
    """`val/<flavour>_rej_70`: background rejections at 70% b-jet efficiency (D_b with
    f_c = 0.2, as salt.evaluate) on every rank's validation jets; none without b, c, u."""
    from salt.evaluation.performance import b_tagging_performance
    from salt.evaluation.predictions import JetScores

    if not rejection_metrics(class_names):
        return {}
    local = (
        (torch.cat(scores).cpu().numpy(), torch.cat(classes).cpu().numpy())
        if scores
        else (np.zeros((0, len(class_names)), np.float32), np.zeros(0, np.int64))
    )
    # every rank calls it, with or without jets (a rank's share may be empty)
    parts = all_gather_object(local, "the validation predictions (for the rejections)")
    probs = np.concatenate([p for p, _ in parts])
    labels = np.concatenate([c for _, c in parts])
    try:
        perf = b_tagging_performance(JetScores(list(class_names), probs, labels), 0.2, [70])
    except ValueError:  # no b-jet among the validation jets
        return {}
    row = perf.working_points[REJECTION_WP]
    return {
        f"val/{k.removesuffix('_rejection')}_rej_{REJECTION_WP}": float(v)
        for k, v in row.items()
        if k.endswith("_rejection") and v is not None and math.isfinite(v)
    }


def rejection_metrics(class_names: list[str]) -> list[str]:
    """The names `rejections_at` gives its rejections for these jet classes, e.g.
    `val/light_rej_70` (none without b, c and light classes: salt's b, c, u or ftag's bjets,
    cjets, ujets)."""
    from salt.evaluation.performance import RESULT_NAMES, SIGNAL, check_classes, jet_flavours

    try:
        check_classes(class_names)
    except ValueError:
        return []
    present = {f.name for f in jet_flavours(class_names).values()}
    # light, c, tau: the order of the printed line
    return [
        f"val/{n}_rej_{REJECTION_WP}" for f, n in RESULT_NAMES.items() if f in present - {SIGNAL}
    ]


def epoch_line(metrics: Mapping[str, float]) -> str:
    """The validation figures of one epoch, as printed."""
    parts = [f"val loss {metrics['val/loss']:.4f}"]
    if "val/jet_accuracy" in metrics:
        parts.append(f"jet accuracy {metrics['val/jet_accuracy']:.3f}")
    parts += [
        f"{name} rejection {metrics[key]:.1f}"
        for name in ("light", "c")
        if (key := f"val/{name}_rej_{REJECTION_WP}") in metrics
    ]
    wp = f" (at {REJECTION_WP}% b-jet efficiency)" if len(parts) > 2 else ""
    return ", ".join(parts) + wp


def summary(
    run: Run,
    seconds: float,
    steps: int,
    best: tuple[int, Mapping[str, float]] | None,
    last: tuple[int, Mapping[str, float]] | None,
) -> str:
    """What a physicist reads first at the end of a run: time, the rejections of the best
    epoch on the validation jets, and the next commands."""
    minutes, secs = divmod(round(seconds), 60)
    lines = [f"salt: trained {steps} steps in {minutes}m{secs:02d}s; run directory {run.run_dir}"]
    shown = best or last
    if shown is not None:
        epoch, metrics = shown
        which = "the best checkpoint" if best is not None else "the last epoch"
        lines.append(f"  validation jets, epoch {epoch} ({which}): {epoch_line(metrics)}")
    lines += [
        "  next:",
        f"    python -m salt.evaluate run_dir={run.run_dir}   # test jets: predictions file, "
        "rejections, ROC",
        f"    python -m salt.export run_dir={run.run_dir}     # ONNX model for ATLAS inference",
    ]
    return "\n".join(lines)
