"""b-tagging performance: the discriminant, background rejections at working points, a ROC plot.

``D_b = ln(p_b / (f_c p_c + (1 - f_c) p_u))``. The cut of a working point with b-jet efficiency
``eff`` is the ``1 - eff`` quantile of D_b over the b-jets; the rejection of a background
flavour is ``1 / (fraction of its jets with D_b above the cut)`` (``inf`` when none passes).
Flavours are the jet classification task's classes named ``b``, ``c``, ``u`` (and ``tau``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from salt.errors import ConfigError
from salt.evaluation.predictions import JetScores
from salt.utils.atomic import yaml_text

WORKING_POINTS = (60, 70, 77, 85)
EPSILON = 1e-10  # keeps the log finite where a probability underflows to 0
SIGNAL = "b"
BACKGROUNDS = {"u": "light", "c": "c", "tau": "tau"}  # class name -> name in the results
REQUIRED_CLASSES = ("b", "c", "u")


def check_settings(f_c: float, working_points: Sequence[float]) -> None:
    if not 0.0 <= float(f_c) <= 1.0:
        raise ConfigError(f"f_c={f_c}: the c-jet fraction must lie in [0, 1].")
    for wp in working_points:
        if not 0.0 < float(wp) < 100.0:
            raise ConfigError(
                f"working_points: {wp} is not a b-jet efficiency in percent (0 < wp < 100)."
            )


def discriminant(p_b: np.ndarray, p_c: np.ndarray, p_u: np.ndarray, f_c: float) -> np.ndarray:
    """``ln(p_b / (f_c p_c + (1 - f_c) p_u))`` in float64."""
    p_b, p_c, p_u = (np.asarray(p, dtype=np.float64) for p in (p_b, p_c, p_u))
    return np.log((p_b + EPSILON) / (f_c * p_c + (1.0 - f_c) * p_u + EPSILON))


def cuts_for(signal: np.ndarray, efficiencies: np.ndarray) -> np.ndarray:
    """Discriminant cuts at which the fraction ``efficiencies`` of ``signal`` lies above."""
    return np.quantile(signal, 1.0 - np.asarray(efficiencies, dtype=np.float64))


def rejections(background: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """``1 / (fraction of background above each cut)``: inf where none passes, nan if empty."""
    if len(background) == 0:
        return np.full(len(cuts), np.nan)
    ordered = np.sort(background)
    passing = len(ordered) - np.searchsorted(ordered, cuts, side="right")
    with np.errstate(divide="ignore"):
        return np.where(passing > 0, len(ordered) / np.maximum(passing, 1), np.inf)


@dataclass
class Performance:
    """Rejections per working point, plus what the ROC curve needs."""

    f_c: float
    counts: dict[str, int]  # jets per flavour (b, c, light, tau)
    working_points: dict[int | float, dict[str, float | None]]
    discriminants: dict[str, np.ndarray]  # per flavour name

    def to_dict(self) -> dict[str, Any]:
        return {
            "discriminant": "ln(p_b / (f_c p_c + (1 - f_c) p_u))",
            "f_c": self.f_c,
            "num_jets": dict(self.counts),
            "working_points": {k: dict(v) for k, v in self.working_points.items()},
        }


def _plain(x: float) -> float | None:
    """A YAML-friendly number: None for nan, inf stays inf."""
    return None if math.isnan(x) else float(x)


def b_tagging_performance(
    scores: JetScores, f_c: float = 0.2, working_points: Sequence[float] = WORKING_POINTS
) -> Performance:
    """Rejections of light, c (and tau) jets at the b-jet efficiency working points.

    Raises ValueError when the classes lack b, c or u, or there is no b-jet.
    """
    check_settings(f_c, working_points)
    names = scores.class_names
    missing = [c for c in REQUIRED_CLASSES if c not in names]
    if missing:
        raise ValueError(
            f"b-tagging performance needs jet classes {list(REQUIRED_CLASSES)}; the model's "
            f"are {names} (no {missing})"
        )
    col = {c: names.index(c) for c in names}
    p = scores.probs
    disc = discriminant(p[:, col["b"]], p[:, col["c"]], p[:, col["u"]], float(f_c))
    flavours = {"b": SIGNAL, **{c: n for c, n in BACKGROUNDS.items() if c in col}}
    per_flavour = {name: disc[scores.labels == col[c]] for c, name in flavours.items()}
    counts = {name: len(d) for name, d in per_flavour.items()}
    if counts["b"] == 0:
        raise ValueError("no b-jets among the labelled test jets")
    effs = np.asarray(working_points, dtype=np.float64) / 100.0
    cuts = cuts_for(per_flavour["b"], effs)
    results: dict[int | float, dict[str, float | None]] = {}
    rej = {name: rejections(d, cuts) for name, d in per_flavour.items() if name != "b"}
    for i, wp in enumerate(working_points):
        key = int(wp) if float(wp).is_integer() else float(wp)
        results[key] = {"cut": float(cuts[i])} | {
            f"{name}_rejection": _plain(float(r[i])) for name, r in rej.items()
        }
    return Performance(float(f_c), counts, results, per_flavour)


def format_table(perf: Performance, title: str = "") -> str:
    """A plain-text table of the rejections, one line per working point."""
    names = [k.removesuffix("_rejection") for k in next(iter(perf.working_points.values()))]
    names = [n for n in names if n != "cut"]
    head = f"{'b-eff':>6} {'cut':>8} " + " ".join(f"{n + ' rej':>10}" for n in names)
    lines = [title] if title else []
    counts = ", ".join(f"{k} {v}" for k, v in perf.counts.items())
    lines += [f"D_b with f_c = {perf.f_c:g}; jets: {counts}", head]
    for wp, row in perf.working_points.items():
        cells = []
        for n in names:
            value = row[f"{n}_rejection"]
            cells.append(f"{'n/a' if value is None else f'{value:.2f}':>10}")
        lines.append(f"{f'{wp}%':>6} {row['cut']:>8.3f} " + " ".join(cells))
    return "\n".join(lines)


def write_performance(perf: Performance, path: Path, extra: dict[str, Any]) -> None:
    """``performance.yaml``: the settings, jet counts and rejections, written to ``path``
    (`salt.evaluate` gives a temporary name of its `OutputSet`)."""
    path.write_text(yaml_text({**extra, **perf.to_dict()}, path), encoding="utf-8")


def plot_roc(perf: Performance, path: Path, title: str = "", eff_min: float = 0.4) -> None:
    """Background rejection vs b-jet efficiency (log y), working points marked: a PNG written
    to ``path`` (`salt.evaluate` gives a temporary name of its `OutputSet`)."""
    effs = np.linspace(eff_min, 1.0, 121)[:-1]  # at 100% every rejection is 1
    cuts = cuts_for(perf.discriminants["b"], effs)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for name, disc in perf.discriminants.items():
        if name == "b" or len(disc) == 0:
            continue
        rej = rejections(disc, cuts)
        ax.plot(effs[np.isfinite(rej)], rej[np.isfinite(rej)], label=f"{name}-jet rejection")
    for wp in perf.working_points:
        ax.axvline(float(wp) / 100.0, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("b-jet efficiency")
    ax.set_ylabel("background rejection")
    ax.set_title(title or f"f_c = {perf.f_c:g}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
