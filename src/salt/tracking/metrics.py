"""The default logger: a JSON-lines metrics file in the run directory, plus PNG plots.

``run_dir/metrics.jsonl`` gets one row per ``log_metrics`` call::

    {"step": 100, "epoch": 0, "time": 1716212345.123, "train/loss": 0.91, "train/lr": 0.001}

At each validation the jet confusion matrix (`salt.tracking.confusion`) replaces
``run_dir/confusion_matrix.json`` (counts and row fractions, with step and epoch) and
``run_dir/plots/confusion_matrix.png``: the latest validation's, beside the curves.

JSON lines rather than CSV because new keys appear mid-run (validation metrics arrive at the
first epoch end), and every row is written and flushed before the call returns, so a crash loses
nothing already logged. JSON has no NaN or infinity; such values are written as ``null``.

A resumed run writes to a new run directory. Given ``resume_state["metrics_file"]`` (what
:meth:`LocalLogger.state_dict` returned in the previous run), the new file starts with a copy of
the previous rows, cut at ``resume_state["metrics_rows"]``: rows logged after the checkpoint was
saved are dropped, because the resumed run logs those steps again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from salt.tracking.base import Logger
from salt.tracking.confusion import as_record, checked_counts, record_json
from salt.tracking.plots import CONFUSION_PLOT, plot_confusion, write_plots
from salt.utils.atomic import atomic_path, atomic_write_text

LOGGER = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFUSION_FILE = "confusion_matrix.json"
PLOTS_DIR = "plots"
# Columns every row has; a metric may not use these names (``epoch`` is folded into the column).
RESERVED = ("step", "time")


def _json_number(name: str, value: Any) -> float | None:
    """A metric value as a JSON-safe float (tensors and numpy scalars included)."""
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"metric {name!r}: expected a number, got {type(value).__name__} {value!r}"
        ) from err
    return number if math.isfinite(number) else None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file; a line that does not parse (a crash mid-write) is skipped."""
    rows: list[dict[str, Any]] = []
    bad = 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    if bad:
        LOGGER.warning("%s: skipped %d line(s) that are not JSON objects", path, bad)
    return rows


class LocalLogger(Logger):
    """Metrics file and plots in ``run_dir``; needs no account and no network."""

    def __init__(
        self,
        run_dir: Path,
        *,
        plots: bool = True,
        resume_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.plot_dir = self.run_dir / PLOTS_DIR
        self.plots = plots
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows = self._start_rows(resume_state or {})
        self._fh: IO[str] | None = self.path.open("a", encoding="utf-8")
        self._plotted_rows = -1

    def _start_rows(self, resume_state: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Rows already in the history; writes them to ``self.path`` when copied from elsewhere."""
        source = resume_state.get("metrics_file")
        if source is None:
            # Same run directory opened again: keep appending to what is there.
            return read_rows(self.path) if self.path.exists() else []
        source = Path(source)
        if not source.is_file():
            # Losing the plotted history must not stop a resumed multi-day training.
            LOGGER.warning(
                "resume_state['metrics_file'] = %s does not exist: the metrics history starts "
                "empty in %s",
                source,
                self.path,
            )
            return []
        rows = read_rows(source)
        n_rows = resume_state.get("metrics_rows")
        if n_rows is not None:
            rows = rows[: int(n_rows)]
        # Temp then rename: the source may be this very file (resume in the same directory).
        with atomic_path(self.path) as tmp, tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
        return rows

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, epoch: int | None = None
    ) -> None:
        if self._fh is None:
            raise RuntimeError(f"{self.path}: log_metrics called after finalize")
        row: dict[str, Any] = {"step": int(step), "epoch": None, "time": round(time.time(), 3)}
        for name, value in metrics.items():
            if name in RESERVED:
                raise ValueError(
                    f"metric name {name!r} is reserved for the {name!r} column of {self.path}"
                )
            if name == "epoch":
                # The loop also logs the epoch as a metric; it belongs in the epoch column.
                if epoch is None:
                    epoch = int(value)
                continue
            row[name] = _json_number(name, value)
        row["epoch"] = None if epoch is None else int(epoch)
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()  # in the OS's hands now: a crash of this process loses nothing
        self.rows.append(row)

    def log_confusion_matrix(
        self,
        counts: Sequence[Sequence[int]],
        class_names: Sequence[str],
        step: int,
        epoch: int | None = None,
    ) -> None:
        counts = checked_counts(counts, class_names)
        record = as_record(counts, class_names, step, epoch)
        atomic_write_text(self.run_dir / CONFUSION_FILE, record_json(record))
        if not self.plots:
            return
        try:
            plot_confusion(counts, class_names, step, epoch, self.plot_dir / CONFUSION_PLOT)
        except Exception:
            # A plotting problem must not end a long training; the JSON file has the numbers.
            LOGGER.warning("could not write %s", self.plot_dir / CONFUSION_PLOT, exc_info=True)

    def on_epoch_end(self, epoch: int) -> None:
        if self._fh is not None:
            # Once an epoch (not per row: fsync is slow on shared cluster file systems).
            os.fsync(self._fh.fileno())
        self._refresh_plots()

    def _refresh_plots(self) -> None:
        if not self.plots or len(self.rows) == self._plotted_rows:
            return
        try:
            write_plots(self.rows, self.plot_dir)
        except Exception:
            # A plotting problem must not end a long training; the metrics file is the record.
            LOGGER.warning("could not refresh the plots in %s", self.plot_dir, exc_info=True)
        else:
            self._plotted_rows = len(self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"metrics_file": str(self.path.resolve()), "metrics_rows": len(self.rows)}

    def finalize(self, status: str = "success") -> None:
        if self._fh is None:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        self._refresh_plots()  # the last partial epoch shows up too
