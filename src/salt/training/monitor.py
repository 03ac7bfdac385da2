"""The validation metric that names the epoch checkpoints and picks the best one
(`trainer.monitor`, `trainer.monitor_mode`): in training, and for the checkpoint
salt.evaluate and salt.export take by default.

`auto` monitors the jet flavour task's loss (`val/jet_classification_loss` for GN2), as the
old tool (`val/jets_classification_loss`); a tagger without a jet classification task, the
total `val/loss`. Any metric the validation logs can be monitored instead: `val/loss`,
`val/<task>_loss`, `val/jet_accuracy`, and the rejections at 70% b-jet efficiency
`val/light_rej_70`, `val/c_rej_70` (`val/tau_rej_70`), with the lowest value best for a loss
and the highest for the others (`monitor_mode: auto`; or `min`, `max`).

A monitored loss names the checkpoints `epoch=003-val_loss=0.61234.ckpt` (the old tool's
name, and every run directory's from before other metrics could be monitored); another metric
names them by itself, `epoch=003-val_light_rej_70=87.40000.ckpt`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from salt.errors import ConfigError
from salt.training import checkpoint as ckpt
from salt.training.report import rejection_metrics
from salt.utils.names import did_you_mean

if TYPE_CHECKING:
    from salt import models
    from salt.training.state import Counters

log = logging.getLogger("salt")

AUTO_METRIC = "auto"


@dataclass(frozen=True)
class Monitor:
    """A validation metric and whether its lowest (min) or highest (max) value is best."""

    metric: str = "val/loss"
    mode: str = "min"

    @property
    def name(self) -> str:
        """As the checkpoints' counters record it: a resume that monitors another metric
        starts its best anew."""
        return f"{self.metric} ({self.mode})"

    @property
    def file_key(self) -> str:
        return file_key(self.metric)

    @property
    def worst(self) -> float:
        """The best value before any epoch: every finite value improves on it."""
        return math.inf if self.mode == "min" else -math.inf

    def value(self, metrics: Mapping[str, float]) -> float:
        """The metric in an epoch's `metrics`; NaN (never best) when the epoch has none (the
        rejections of validation jets without a b-jet)."""
        if self.metric not in metrics:
            log.warning(
                "salt: %s is missing this epoch (no b-jets?): not a best epoch", self.metric
            )
            return math.nan
        return float(metrics[self.metric])

    def improves(self, value: float, best: float) -> bool:
        """Whether `value` is as good as `best` or better (the later epoch is best on a tie);
        a non-finite value never is."""
        if not math.isfinite(value):
            return False
        return value <= best if self.mode == "min" else value >= best

    def checkpoint_name(self, epoch: int, value: float) -> str:
        return ckpt.checkpoint_name(epoch, value, self.file_key)


def is_loss(metric: str) -> bool:
    return metric == AUTO_METRIC or metric.endswith("loss")


def file_key(metric: str) -> str:
    """The key of the checkpoint names for `metric`: val_loss for every loss (the old tool's
    name, whichever loss it monitors), else the metric's own name (`val_light_rej_70`)."""
    return ckpt.LOSS_KEY if is_loss(metric) else metric.replace("/", "_")


def resolve_mode(metric: str, mode: str) -> str:
    """`mode`, with auto: min for a loss, max for the others (accuracy, rejections)."""
    if mode != "auto":
        return mode
    return "min" if is_loss(metric) else "max"


def validation_metrics(tagger: models.Tagger) -> list[str]:
    """The metrics `salt.training.loop.validate` logs for `tagger`."""
    names = ["val/loss", *(f"val/{t}_loss" for t in tagger.tasks)]
    task = tagger.flavour_task()
    if task is not None:
        names += ["val/jet_accuracy", *rejection_metrics(task.class_names)]
    return names


def monitored(name: str, mode: str, tagger: models.Tagger) -> Monitor:
    """`trainer.monitor` and `trainer.monitor_mode` for `tagger` (auto: the jet flavour task's
    loss, as the old tool, else the total); a metric the validation does not log is a
    ConfigError naming the ones it does."""
    if name == AUTO_METRIC:
        task = tagger.flavour_task()
        metric = f"val/{task.name}_loss" if task is not None else "val/loss"
    else:
        metric = name
        known = validation_metrics(tagger)
        if metric not in known:
            raise ConfigError(
                f"trainer.monitor={name!r}: expected auto or one of {known}"
                + did_you_mean(name, known)
            )
    return Monitor(metric, resolve_mode(metric, mode))


def continue_best(counters: Counters, monitor: Monitor) -> None:
    """After a resume: the checkpoint's best value stands if it was kept for the same metric
    (or for a loss, by a checkpoint from before the metric was recorded), else no epoch is
    best yet."""
    saved = counters.monitor
    if saved == monitor.name or (not saved and monitor.mode == "min"):
        counters.monitor = monitor.name
        return
    log.info(
        "salt: the checkpoint kept the best of %s, this run monitors %s: its best starts anew",
        saved or "val_loss (min)",
        monitor.name,
    )
    counters.monitor, counters.best_val_loss = monitor.name, monitor.worst


def run_monitor(run_dir: Path) -> Monitor:
    """What a run directory monitored, from its config.yaml (which `auto` it resolved to does
    not matter here: every loss names the checkpoints val_loss, lowest best). A run from
    before `trainer.monitor_mode`, or without a readable config, monitored a loss."""
    metric, mode = AUTO_METRIC, "auto"
    try:
        trainer: Any = OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "trainer")
        metric = str(trainer.get("monitor", metric))
        mode = str(trainer.get("monitor_mode", mode))
    except (OSError, AttributeError, yaml.YAMLError, OmegaConfBaseException):
        pass  # no readable config.yaml (its reader names that): the loss, as before
    return Monitor(metric, resolve_mode(metric, mode if mode in ("min", "max") else "auto"))


def best_checkpoint_of(run_dir: str | Path) -> Path | None:
    """The best epoch checkpoint of a run directory by the metric the run monitored: what
    salt.evaluate and salt.export take, and `finetune.ckpt_path=<run dir>` loads."""
    monitor = run_monitor(Path(run_dir))
    return ckpt.best_checkpoint(Path(run_dir) / "ckpts", monitor.mode, monitor.file_key)


def no_best_checkpoint(run_dir: str | Path) -> str:
    """What is missing when `best_checkpoint_of` found nothing."""
    monitor = run_monitor(Path(run_dir))
    return (
        f"{Path(run_dir) / 'ckpts'}: no epoch=...-{monitor.file_key}=....ckpt checkpoint with a "
        f"finite value of the monitored {monitor.metric if monitor.metric != 'auto' else 'loss'}"
    )
