"""PNG plots of the metrics history (loss per task, learning rate, gradient norm, jet
classification accuracy) and of the latest validation's jet confusion matrix.

The plots are drawn from the rows of the local metrics file (one dict per logging call, with
``step`` and ``epoch``). Figures are built with :class:`matplotlib.figure.Figure` directly, not
``pyplot``: no global figure registry (no leak over thousands of refreshes) and no change to the
user's interactive backend; a bare ``Figure`` renders with Agg.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from salt.tracking.confusion import row_fractions
from salt.utils.atomic import atomic_path

Row = Mapping[str, Any]

LOSS_PLOT = "loss.png"
LR_PLOT = "lr.png"
GRAD_NORM_PLOT = "grad_norm.png"
ACCURACY_PLOT = "accuracy.png"
CONFUSION_PLOT = "confusion_matrix.png"


def _series(rows: Iterable[Row], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """The (x, value) points of one metric, skipping rows without it (or with a null value)."""
    xs: list[float] = []
    ys: list[float] = []
    for row in rows:
        value, pos = row.get(key), row.get(x)
        if isinstance(value, (int, float)) and isinstance(pos, (int, float)):
            xs.append(float(pos))
            ys.append(float(value))
    return xs, ys


def loss_names(rows: Iterable[Row]) -> list[str]:
    """Loss names without the split prefix: ``loss`` (the total) first, then tasks sorted."""
    names: set[str] = set()
    for row in rows:
        for key in row:
            split, _, name = key.partition("/")
            if split in ("train", "val") and (name == "loss" or name.endswith("_loss")):
                names.add(name)
    return sorted(names, key=lambda n: (n != "loss", n))


def _save(fig: Figure, path: Path) -> None:
    """Write atomically: a reader (or a crash) never sees a half-written PNG."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _grid(n: int) -> tuple[int, int]:
    ncols = 1 if n == 1 else 2
    return math.ceil(n / ncols), ncols


def plot_losses(rows: Sequence[Row], path: Path) -> bool:
    """One panel per loss (total, then each task): train and validation against step."""
    names = loss_names(rows)
    if not names:
        return False
    nrows, ncols = _grid(len(names))
    fig = Figure(figsize=(6.4 * ncols, 4.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        for split, style in (("train", {"lw": 1.0}), ("val", {"marker": "o", "lw": 1.5})):
            xs, ys = _series(rows, f"{split}/{name}")
            if xs:
                ax.plot(xs, ys, label=split, **style)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    _save(fig, path)
    return True


def _plot_single(
    rows: Sequence[Row],
    keys: Sequence[str],
    x: str,
    ylabel: str,
    path: Path,
    log_y: bool = False,
) -> bool:
    """One panel with one line per metric in ``keys`` that has data (``log_y``: a log axis,
    where values span decades, as gradient norms do)."""
    series = {key: _series(rows, key, x) for key in keys}
    series = {key: xy for key, xy in series.items() if xy[0]}
    if not series:
        return False
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for key, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if x == "epoch" else None, label=key)
    if x == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log_y:
        ax.set_yscale("log")  # a zero norm is left out, not drawn at -inf
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return True


def write_plots(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """Refresh every plot that has data under ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = {key for row in rows for key in row}
    lr_keys = sorted(k for k in keys if k.endswith("/lr"))
    norm_keys = sorted(k for k in keys if k.endswith("/grad_norm"))
    acc_keys = sorted(k for k in keys if k.startswith("val/") and k.endswith("accuracy"))
    written = []
    if plot_losses(rows, out_dir / LOSS_PLOT):
        written.append(out_dir / LOSS_PLOT)
    if _plot_single(rows, lr_keys, "step", "learning rate", out_dir / LR_PLOT):
        written.append(out_dir / LR_PLOT)
    norm_label = "gradient norm (before clipping)"
    if _plot_single(rows, norm_keys, "step", norm_label, out_dir / GRAD_NORM_PLOT, log_y=True):
        written.append(out_dir / GRAD_NORM_PLOT)
    if _plot_single(rows, acc_keys, "epoch", "accuracy", out_dir / ACCURACY_PLOT):
        written.append(out_dir / ACCURACY_PLOT)
    return written


def confusion_figure(
    counts: Sequence[Sequence[int]],
    class_names: Sequence[str],
    step: int,
    epoch: int | None = None,
) -> Figure:
    """The confusion matrix of one validation: colour and number are the fraction of each truth
    class (row) given each predicted class (column); the row labels carry the jet counts."""
    fractions = np.array(row_fractions(counts), dtype=float)
    n = len(class_names)
    size = 1.2 + 0.9 * n
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)  # NaN rows stay blank
    fig.colorbar(image, ax=ax, label="fraction of the truth class")
    for t in range(n):
        for p in range(n):
            value = fractions[t, p]
            if np.isfinite(value):
                colour = "white" if value > 0.6 else "black"
                ax.text(p, t, f"{value:.2f}", ha="center", va="center", color=colour)
    ax.set_xticks(range(n), labels=list(class_names))
    jets = [f"{name}\n({sum(row)} jets)" for name, row in zip(class_names, counts, strict=True)]
    ax.set_yticks(range(n), labels=jets)
    ax.set_xlabel("predicted (highest score)")
    ax.set_ylabel("truth")
    when = f"step {step}" if epoch is None else f"epoch {epoch}, step {step}"
    ax.set_title(f"validation jets, {when}")
    return fig


def plot_confusion(
    counts: Sequence[Sequence[int]],
    class_names: Sequence[str],
    step: int,
    epoch: int | None,
    path: Path,
) -> Path:
    """Write `confusion_figure` to ``path`` (replacing the previous validation's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(confusion_figure(counts, class_names, step, epoch), path)
    return path


def figure_rgb(fig: Figure) -> np.ndarray:
    """The figure rendered as an (height, width, 3) uint8 image, for loggers that take pixels
    (TensorBoard's add_image), without pyplot."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
