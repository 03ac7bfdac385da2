"""``build_logger``: the ``logger`` config group (``conf/logger/*.yaml``) to a :class:`Logger`.

``type: local`` writes the metrics file and plots; ``type: comet`` and ``type: tensorboard``
write those too and log to comet or to TensorBoard event files; ``type: none`` (or no config at
all, as in ``fast_dev_run``) records nothing. Every type but none keeps the local files: they
need no account, no network and no viewer.
"""

from __future__ import annotations

import enum
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from salt.errors import LoggerConfigError
from salt.tracking.base import Logger, MultiLogger, NullLogger
from salt.utils import typed_config


class LoggerType(enum.StrEnum):
    none = "none"
    local = "local"
    comet = "comet"
    tensorboard = "tensorboard"


COMET_KEYS = ("project_name", "workspace", "offline")


@dataclass
class LoggerConfig:
    """The `logger` node (conf/logger/*.yaml). The comet keys are null for the other types."""

    type: LoggerType = LoggerType.local
    # training losses, learning rate, gradient norm and throughput every N steps
    log_every_n_steps: int = 50
    plots: bool = True  # refresh <run_dir>/plots/*.png every epoch
    # comet: the API key is read by comet from COMET_API_KEY (or ~/.comet.config), never here
    project_name: str | None = None  # default: salt
    workspace: str | None = None
    offline: bool | None = None  # default: false

    @classmethod
    def read(cls, node: LoggerConfig | Mapping[str, Any] | DictConfig) -> LoggerConfig:
        return typed_config.read(cls, node, "logger")

    def check(self, where: str) -> None:
        typed_config.at_least(self.log_every_n_steps, f"{where}.log_every_n_steps", 1)
        if self.type != LoggerType.comet:
            for key in COMET_KEYS:
                if key != "workspace" and getattr(self, key) is not None:
                    raise LoggerConfigError(
                        f"{where}.{key}: a comet setting, but logger.type={self.type} "
                        "(use logger=comet)"
                    )
        if self.type == LoggerType.tensorboard:
            check_tensorboard(f"{where}.type")


def check_tensorboard(where: str) -> None:
    """The ``tensorboard`` package that torch's SummaryWriter writes with; an environment
    made before salt depended on it may lack it: say so before the run starts."""
    if importlib.util.find_spec("tensorboard") is None:
        raise LoggerConfigError(
            f"{where}=tensorboard needs the tensorboard package, which is not installed in "
            "this Python environment; expected it as a salt dependency: "
            "`pip install tensorboard` (or reinstall salt: `pip install -e .`)"
        )


def build_logger(
    cfg: LoggerConfig | DictConfig | Mapping[str, Any] | None,
    run_dir: Path,
    *,
    run_name: str,
    resume_state: Mapping[str, Any] | None = None,
) -> Logger:
    """The logger for this run; call on rank 0 only (other ranks use :class:`NullLogger`).

    ``resume_state`` is the ``state_dict()`` of the previous run's logger, from its checkpoint:
    the metrics history is copied into the new run directory and comet continues the same
    experiment; the TensorBoard event files are copied up to the checkpoint's step.
    """
    if cfg is None:
        return NullLogger()
    conf = LoggerConfig.read(cfg)
    if conf.type == LoggerType.none:
        return NullLogger()
    # Imported here so `logger=none` never pays for matplotlib (or comet_ml) imports.
    from salt.tracking.metrics import LocalLogger

    local = LocalLogger(Path(run_dir), plots=conf.plots, resume_state=resume_state)
    if conf.type == LoggerType.local:
        return local
    try:
        other = _backend(conf, Path(run_dir), run_name, resume_state)
    except BaseException:
        local.finalize("failed")  # close the metrics file before the error propagates
        raise
    return MultiLogger([local, other])


def _backend(
    conf: LoggerConfig, run_dir: Path, run_name: str, resume_state: Mapping[str, Any] | None
) -> Logger:
    """The logger beside the local one: comet or TensorBoard."""
    if conf.type == LoggerType.tensorboard:  # installed: checked when the config was read
        from salt.tracking.tensorboard import TensorBoardLogger

        return TensorBoardLogger(run_dir, resume_state=resume_state)
    from salt.tracking.comet import CometLogger

    return CometLogger(
        run_dir,
        run_name=run_name,
        project_name=conf.project_name or "salt",
        workspace=conf.workspace,
        offline=bool(conf.offline),
        resume_state=resume_state,
    )
