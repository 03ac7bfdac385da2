"""Comet logging (``logger=comet``), online or as an offline archive in the run directory.

The API key comes from where users already keep it, ``COMET_API_KEY`` in the environment (or
comet's own ``~/.comet.config``), and is read only by comet itself: it is never passed through
salt's config, never logged, never stored. With no key, or ``logger.offline=true``, the run is
logged offline to ``run_dir/comet/<experiment key>.zip``; ``comet upload <zip>`` sends it later.

Every comet auto-logger is off (stdout capture, environment and host details, system metrics,
installed packages, git metadata and patch, source code, command line, framework hooks): they
could capture secrets from the environment or the terminal, and salt logs what it needs
explicitly. The experiment key goes into :meth:`CometLogger.state_dict`, hence the checkpoint,
so a resumed run continues the same experiment. comet's error reports to Sentry are off too:
an offline run must not open a network connection.

A new experiment gets the run directory's config.yaml and its copies of the norm and class
dicts as assets (`CometLogger.log_files`; none of them holds the key); a resumed one has them
already. Each validation's jet confusion matrix is logged as comet's confusion-matrix asset.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from salt.tracking.base import Logger
from salt.tracking.confusion import checked_counts
from salt.utils.nested import flatten

LOGGER = logging.getLogger(__name__)

COMET_DIR = "comet"
# comet's own rule for experiment keys.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9]{32,50}")


def _import_comet() -> Any:
    """Import comet_ml lazily (it is slow to import and only this backend needs it)."""
    # Both are read by comet_ml at import time; a user's own setting wins.
    # Framework monkey-patching would auto-log model graphs and metrics twice: salt logs
    # explicitly.
    os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
    # comet_ml otherwise reports its internal errors to Sentry over the network, offline too.
    os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
    import comet_ml

    return comet_ml


def _check_experiment_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"resume_state['experiment_key'] = {key!r}: expected a comet experiment key "
            "(32 to 50 letters and digits), as saved by a previous run's checkpoint"
        )
    return key


class CometLogger(Logger):
    """One comet experiment; rank 0 only (the factory's caller guarantees it)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        run_name: str,
        project_name: str = "salt",
        workspace: str | None = None,
        offline: bool = False,
        resume_state: Mapping[str, Any] | None = None,
    ) -> None:
        comet_ml = _import_comet()
        self.offline_dir = Path(run_dir) / COMET_DIR
        # Only whether a key exists is looked at here; the key itself stays inside comet.
        has_key = bool(comet_ml.get_config()["comet.api_key"])
        self.online = has_key and not offline
        if not has_key and not offline:
            LOGGER.warning(
                "comet: COMET_API_KEY is not set, logging offline to %s; upload it later with "
                "`comet upload %s/*.zip`",
                self.offline_dir,
                self.offline_dir,
            )
        previous_key = (resume_state or {}).get("experiment_key")
        if previous_key is not None:
            previous_key = _check_experiment_key(previous_key)
        self.offline_dir.mkdir(parents=True, exist_ok=True)
        config = comet_ml.ExperimentConfig(
            name=run_name,
            # Online runs also fall back to an archive here if the network goes away.
            offline_directory=str(self.offline_dir),
            auto_output_logging=False,
            auto_param_logging=False,
            auto_metric_logging=False,
            auto_log_co2=False,
            parse_args=False,
            log_code=False,
            log_graph=False,
            log_git_metadata=False,
            log_git_patch=False,
            log_env_details=False,
            log_env_gpu=False,
            log_env_host=False,
            log_env_cpu=False,
            log_env_network=False,
            log_env_disk=False,
            display_summary_level=0,
        )
        self.experiment = comet_ml.start(
            # An exported but empty variable means "not set".
            workspace=workspace or None,
            project_name=project_name or "salt",
            experiment_key=previous_key,
            # get_or_create: resuming works even when the first part is still an un-uploaded
            # archive (comet merges both on upload).
            mode="create" if previous_key is None else "get_or_create",
            online=self.online,
            experiment_config=config,
        )
        self.experiment_key: str = self.experiment.get_key()
        self.resumed = previous_key is not None
        self._ended = False

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.experiment.log_parameters(flatten(params))

    def log_metadata(self, meta: Mapping[str, Any]) -> None:
        self.experiment.log_others(flatten(meta))

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, epoch: int | None = None
    ) -> None:
        values = {name: float(value) for name, value in metrics.items()}
        self.experiment.log_metrics(values, step=int(step), epoch=epoch)

    def log_confusion_matrix(
        self,
        counts: Sequence[Sequence[int]],
        class_names: Sequence[str],
        step: int,
        epoch: int | None = None,
    ) -> None:
        # Counts, not fractions: comet's viewer normalises rows itself and shows the counts.
        self.experiment.log_confusion_matrix(
            matrix=checked_counts(counts, class_names),
            labels=list(class_names),
            title="validation jets",
            row_label="truth",
            column_label="predicted (highest score)",
            step=int(step),
            epoch=epoch,
        )

    def log_files(self, paths: Sequence[Path]) -> None:
        if self.resumed:
            return  # logged when the experiment started; again would list each file twice
        for path in paths:
            # Under its own name (config.yaml, norm_dict.yaml, ...), not a temporary copy's.
            self.experiment.log_asset(str(path), file_name=Path(path).name)

    def state_dict(self) -> dict[str, Any]:
        return {"experiment_key": self.experiment_key}

    def finalize(self, status: str = "success") -> None:
        if self._ended:
            return
        self._ended = True
        self.experiment.log_other("status", status)
        # Offline: writes the archive under run_dir/comet and prints the upload command.
        self.experiment.end()
