"""b-tagging performance with atlas-ftag-tools: the discriminant, background rejections with
their statistical uncertainties at working points, the ROC and discriminant plots.

The numbers come from FTAG's own functions (`ftag.utils.metrics`: ``get_discriminant``,
``calculate_rejection`` with its ``weighted_percentile`` cuts, ``calculate_rejection_error``), on
the probabilities as the predictions file holds them, so they equal what puma shows for that
file:

- ``D_b = ln(p_b / (f_c p_c + f_tau p_tau + (1 - f_c - f_tau) p_u))`` (``p_tau`` only counts
  with ``f_tau > 0``; ftag's ``fraction_values`` ``{fc, fu, ftau}``);
- the cut of a working point with b-jet efficiency ``eff`` is the weighted ``1 - eff``
  percentile of D_b over the b-jets;
- the rejection of a background flavour is ``1 / eff_bkg``, ``eff_bkg`` the fraction of its jets
  at or above the cut (``inf`` when none is); its statistical uncertainty is binomial,
  ``rej^2 sqrt(eff_bkg (1 - eff_bkg) / N_bkg)`` (null where the rejection is infinite).

Flavours are the jet classification task's classes, salt's short names ``b, c, u, tau`` or
ftag's own ``bjets, cjets, ujets, taujets`` (`flavour_of`); the results name them ``b, c, light,
tau``.

The plots are the ones puma draws (a normalised step histogram of D_b per truth flavour with
the working-point cuts, log y; the rejection of each background against the b-jet efficiency,
log y, with its uncertainty as a band), drawn with matplotlib: puma-hep itself pins older
matplotlib and numpy than salt uses and brings 66 packages into a bare venv, so it is no dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ftag
import numpy as np
from ftag import Flavours, Label, LabelContainer
from ftag.utils.metrics import (
    calculate_rejection,
    calculate_rejection_error,
    get_discriminant,
    weighted_percentile,
)
from matplotlib.figure import Figure

from salt.errors import ConfigError
from salt.evaluation.predictions import JetScores
from salt.utils.atomic import yaml_text
from salt.utils.flavours import SHORT_NAMES, flavour_of

WORKING_POINTS = (60, 70, 77, 85)
EPSILON = 1e-10  # ftag's default: keeps the log finite where a probability underflows to 0
SIGNAL = "bjets"
# in the results, in this order
RESULT_NAMES = {"bjets": "b", "ujets": "light", "cjets": "c", "taujets": "tau"}
REQUIRED_CLASSES = ("b", "c", "u")  # in salt's names; ftag's bjets, cjets, ujets do as well
DISCRIMINANT = "ln(p_b / (f_c p_c + f_tau p_tau + (1 - f_c - f_tau) p_u))"
REJECTION_ERR = (
    "statistical (binomial): rej^2 sqrt(eff (1 - eff) / N), eff = 1 / rej, N the flavour's "
    "jets; null where no jet passes the cut"
)


def check_settings(f_c: float, working_points: Sequence[float], f_tau: float = 0.0) -> None:
    for key, value in (("f_c", f_c), ("f_tau", f_tau)):
        if not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"{key}={value}: the fraction must lie in [0, 1].")
    if float(f_c) + float(f_tau) > 1.0:
        raise ConfigError(
            f"f_c={f_c}, f_tau={f_tau}: the fractions add up to more than 1 (the light-jet "
            "fraction is 1 - f_c - f_tau)."
        )
    for wp in working_points:
        if not 0.0 < float(wp) < 100.0:
            raise ConfigError(
                f"working_points: {wp} is not a b-jet efficiency in percent (0 < wp < 100)."
            )


def fraction_values(f_c: float, f_tau: float = 0.0) -> dict[str, float]:
    """The background fractions as ftag and puma take them (rounded: 1 - 0.2 - 0.01 is
    0.7899999999999999 in floating point)."""
    return {"fc": float(f_c), "fu": round(1.0 - f_c - f_tau, 12), "ftau": float(f_tau)}


def jet_flavours(class_names: Sequence[str]) -> dict[int, Label]:
    """The class index of each b, c, light and tau class, as its ftag flavour."""
    out: dict[int, Label] = {}
    for i, name in enumerate(class_names):
        flavour = flavour_of(name)
        if flavour is not None and flavour.name in RESULT_NAMES:
            out[i] = flavour
    return out


def check_classes(class_names: Sequence[str]) -> None:
    """ValueError unless the classes hold b, c and light jets."""
    found = {f.name for f in jet_flavours(class_names).values()}
    missing = [c for c in REQUIRED_CLASSES if SHORT_NAMES[c] not in found]
    if missing:
        raise ValueError(
            f"b-tagging performance needs jet classes {list(REQUIRED_CLASSES)} (or ftag's "
            f"bjets, cjets, ujets); the model's are {list(class_names)} (no {missing})"
        )


def check_tau_fraction(class_names: Sequence[str], f_tau: float) -> None:
    """ConfigError for ``f_tau > 0`` when no class is tau jets (`salt.evaluate` checks it
    before predicting)."""
    if f_tau > 0 and "taujets" not in {f.name for f in jet_flavours(class_names).values()}:
        raise ConfigError(
            f"f_tau={f_tau}: the model's jet classes {list(class_names)} have no tau class "
            "(tau or taujets); use f_tau=0."
        )


def discriminant(
    probs: np.ndarray,
    class_names: Sequence[str],
    f_c: float,
    f_tau: float = 0.0,
    tagger: str = "salt",
) -> np.ndarray:
    """D_b of every jet by ftag's ``get_discriminant``, from the class probabilities ``[N, C]``
    in the dtype the predictions file holds (ftag computes in that dtype)."""
    flavours = jet_flavours(class_names)
    jets = np.empty(
        len(probs), dtype=[(f"{tagger}_{f.px}", probs.dtype) for f in flavours.values()]
    )
    for i, flavour in flavours.items():
        jets[f"{tagger}_{flavour.px}"] = probs[:, i]
    container = LabelContainer.from_list(list(flavours.values()))
    return get_discriminant(
        jets, tagger, Flavours[SIGNAL], container, fraction_values(f_c, f_tau), EPSILON
    )


def rejections(
    signal: np.ndarray, background: np.ndarray, efficiencies: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rejections, their binomial uncertainties, cuts) of ``background`` at the b-jet
    ``efficiencies`` of ``signal`` (discriminant values), with ftag's functions. Rejections
    are inf where no background jet passes (uncertainty nan), nan without background jets."""
    efficiencies = np.asarray(efficiencies, dtype=np.float64)
    # ftag compares the sum of float16 weights (a half-precision file) with 1e6, which
    # overflows float16: a harmless RuntimeWarning (the comparison still picks its dtype)
    with np.errstate(over="ignore"):
        cuts = weighted_percentile(signal, 1.0 - efficiencies)  # as calculate_rejection's
        if len(background) == 0:  # ftag would divide 0 by 0
            nan = np.full(len(efficiencies), np.nan)
            return nan, nan.copy(), cuts
        rej = calculate_rejection(signal, background, efficiencies)
    err = np.full(len(rej), np.nan)
    finite = np.isfinite(rej)
    if finite.any():
        err[finite] = calculate_rejection_error(rej[finite], len(background))
    return rej, err, cuts


@dataclass
class Performance:
    """Rejections per working point, plus what the plots need."""

    f_c: float
    f_tau: float
    counts: dict[str, int]  # jets per flavour (b, c, light, tau)
    working_points: dict[int | float, dict[str, float | None]]
    discriminants: dict[str, np.ndarray]  # per flavour name

    def to_dict(self) -> dict[str, Any]:
        return {
            "discriminant": DISCRIMINANT,
            "f_c": self.f_c,
            "f_tau": self.f_tau,
            "fraction_values": fraction_values(self.f_c, self.f_tau),  # as puma takes them
            "computed_with": f"atlas-ftag-tools {ftag.__version__}",
            "rejection_err": REJECTION_ERR,
            "num_jets": dict(self.counts),
            "working_points": {k: dict(v) for k, v in self.working_points.items()},
        }


def _plain(x: float) -> float | None:
    """A YAML-friendly number: None for nan, inf stays inf."""
    return None if math.isnan(x) else float(x)


def b_tagging_performance(
    scores: JetScores,
    f_c: float = 0.2,
    working_points: Sequence[float] = WORKING_POINTS,
    f_tau: float = 0.0,
) -> Performance:
    """Rejections of light, c (and tau) jets at the b-jet efficiency working points.

    Raises ValueError when the classes lack b, c or u, or there are fewer than 2 b-jets
    (ftag's percentile needs two); ConfigError for ``f_tau > 0`` without a tau class.
    """
    check_settings(f_c, working_points, f_tau)
    check_tau_fraction(scores.class_names, f_tau)
    check_classes(scores.class_names)
    disc = discriminant(scores.probs, scores.class_names, float(f_c), float(f_tau))
    index = {f.name: i for i, f in jet_flavours(scores.class_names).items()}
    per_flavour = {
        name: disc[scores.labels == index[flavour]]
        for flavour, name in RESULT_NAMES.items()
        if flavour in index
    }
    counts = {name: len(d) for name, d in per_flavour.items()}
    if counts["b"] < 2:
        raise ValueError(f"{counts['b']} b-jets among the labelled test jets; expected 2 or more")
    effs = np.asarray(working_points, dtype=np.float64) / 100.0
    rej = {
        name: rejections(per_flavour["b"], d, effs)
        for name, d in per_flavour.items()
        if name != "b"
    }
    cuts = next(iter(rej.values()))[2]
    results: dict[int | float, dict[str, float | None]] = {}
    for i, wp in enumerate(working_points):
        key = int(wp) if float(wp).is_integer() else float(wp)
        row: dict[str, float | None] = {"cut": float(cuts[i])}
        for name, (values, errors, _) in rej.items():
            row[f"{name}_rejection"] = _plain(float(values[i]))
            row[f"{name}_rejection_err"] = _plain(float(errors[i]))
        results[key] = row
    return Performance(float(f_c), float(f_tau), counts, results, per_flavour)


def format_table(perf: Performance, title: str = "") -> str:
    """A plain-text table of the rejections (± their uncertainty), one line per working point."""
    row0 = next(iter(perf.working_points.values()))
    names = [k.removesuffix("_rejection") for k in row0 if k.endswith("_rejection")]
    head = f"{'b-eff':>6} {'cut':>8} " + " ".join(f"{n + ' rej':>18}" for n in names)
    lines = [title] if title else []
    counts = ", ".join(f"{k} {v}" for k, v in perf.counts.items())
    tau = f", f_tau = {perf.f_tau:g}" if perf.f_tau else ""
    lines += [f"D_b with f_c = {perf.f_c:g}{tau}; jets: {counts}", head]
    for wp, row in perf.working_points.items():
        cells = []
        for n in names:
            value, err = row[f"{n}_rejection"], row[f"{n}_rejection_err"]
            text = "n/a" if value is None else f"{value:.2f}"
            if value is not None and err is not None:
                text += f" ± {err:.2f}"
            cells.append(f"{text:>18}")
        lines.append(f"{f'{wp}%':>6} {row['cut']:>8.3f} " + " ".join(cells))
    return "\n".join(lines)


def write_performance(perf: Performance, path: Path, extra: dict[str, Any]) -> None:
    """``performance.yaml``: the settings, jet counts and rejections, written to ``path``
    (`salt.evaluate` gives a temporary name of its `OutputSet`)."""
    path.write_text(yaml_text({**extra, **perf.to_dict()}, path), encoding="utf-8")


def _flavour(name: str) -> Label:
    """The ftag flavour of a result name (b, c, light, tau): its colour and label."""
    return Flavours[{v: k for k, v in RESULT_NAMES.items()}[name]]


def _tau_text(perf: Performance) -> str:
    return f", $f_\\tau$ = {perf.f_tau:g}" if perf.f_tau else ""


def plot_roc(perf: Performance, path: Path, title: str = "", eff_min: float = 0.4) -> None:
    """Background rejection vs b-jet efficiency (log y), its statistical uncertainty as a band,
    working points marked: a PNG written to ``path`` (`salt.evaluate` gives a temporary name
    of its `OutputSet`)."""
    effs = np.linspace(eff_min, 1.0, 121)[:-1]  # at 100% every rejection is 1
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for name, disc in perf.discriminants.items():
        if name == "b" or len(disc) == 0:
            continue
        rej, err, _ = rejections(perf.discriminants["b"], disc, effs)
        ok = np.isfinite(rej)
        flavour = _flavour(name)
        ax.plot(effs[ok], rej[ok], color=flavour.colour, label=f"{flavour.label} rejection")
        band = ok & np.isfinite(err)
        ax.fill_between(
            effs[band],
            np.maximum(rej[band] - err[band], 1.0),
            rej[band] + err[band],
            color=flavour.colour,
            alpha=0.3,
            linewidth=0,
        )
    for wp in perf.working_points:
        ax.axvline(float(wp) / 100.0, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("$b$-jet efficiency")
    ax.set_ylabel("background rejection")
    ax.set_title(title or f"$f_c$ = {perf.f_c:g}{_tau_text(perf)}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def plot_discriminant(perf: Performance, path: Path, title: str = "", bins: int = 50) -> None:
    """D_b per truth flavour (normalised step histograms, log y) with the working-point cuts:
    a PNG written to ``path`` (`salt.evaluate` gives a temporary name of its `OutputSet`)."""
    finite = {n: d[np.isfinite(d)] for n, d in perf.discriminants.items()}
    values = np.concatenate([d for d in finite.values()])
    low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for name, disc in finite.items():
        if len(disc) == 0:
            continue
        flavour = _flavour(name)
        ax.hist(
            disc,
            bins=edges,
            density=True,
            histtype="step",
            color=flavour.colour,
            label=flavour.label,
        )
    ax.set_yscale("log")
    bottom, top = ax.get_ylim()
    top *= 30  # room above the histograms for the legend and the working points' labels
    ax.set_ylim(bottom, top)
    for wp, row in perf.working_points.items():
        cut = row["cut"]
        assert cut is not None
        ax.axvline(cut, color="grey", linestyle="--", linewidth=0.8)
        ax.text(cut, top, f"{wp}%", rotation=90, va="top", ha="right", fontsize=8)
    ax.set_xlabel("$D_b$")
    ax.set_ylabel("normalised number of jets")
    ax.set_title(title or f"$f_c$ = {perf.f_c:g}{_tau_text(perf)}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
