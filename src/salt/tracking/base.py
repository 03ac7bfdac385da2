"""The logger interface the training loop talks to, a do-nothing logger and a fan-out logger.

Only rank 0 builds a real logger; every other rank, ``logger=none`` and ``fast_dev_run`` get a
:class:`NullLogger`, so the loop calls the same methods everywhere without checking the rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class Logger:
    """Base class: every method is a no-op, so a backend overrides only what it records."""

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record the merged run configuration (a plain, possibly nested, dict)."""

    def log_metadata(self, meta: Mapping[str, Any]) -> None:
        """Record run facts that are not hyperparameters: git commit, parameter count, ..."""

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, epoch: int | None = None
    ) -> None:
        """Record scalar metrics at a global optimiser step (and the epoch, where known)."""

    def log_confusion_matrix(
        self,
        counts: Sequence[Sequence[int]],
        class_names: Sequence[str],
        step: int,
        epoch: int | None = None,
    ) -> None:
        """Record one validation's jet confusion matrix: ``counts[truth][predicted]`` jets, in
        the order of ``class_names`` (`salt.tracking.confusion` normalises the rows)."""

    def log_files(self, paths: Sequence[Path]) -> None:
        """Keep the files that describe the run (config.yaml, the norm and class dict copies)
        with its record; called on every start, a backend that stores files keeps them once."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called once at the end of every epoch, after the validation metrics are logged."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this record; stored in the checkpoint.

        Must never hold a secret: checkpoints are copied around and shared.
        """
        return {}

    def finalize(self, status: str = "success") -> None:
        """Flush and close; safe to call more than once."""


class NullLogger(Logger):
    """Records nothing and writes no file: ``logger=none``, ``fast_dev_run`` and ranks > 0."""


class MultiLogger(Logger):
    """Sends every call to several loggers in order (``logger=comet`` and
    ``logger=tensorboard`` also keep the local files)."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = list(loggers)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(params)

    def log_metadata(self, meta: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_metadata(meta)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, epoch: int | None = None
    ) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step, epoch)

    def log_confusion_matrix(
        self,
        counts: Sequence[Sequence[int]],
        class_names: Sequence[str],
        step: int,
        epoch: int | None = None,
    ) -> None:
        for logger in self.loggers:
            logger.log_confusion_matrix(counts, class_names, step, epoch)

    def log_files(self, paths: Sequence[Path]) -> None:
        for logger in self.loggers:
            logger.log_files(paths)

    def on_epoch_end(self, epoch: int) -> None:
        for logger in self.loggers:
            logger.on_epoch_end(epoch)

    def state_dict(self) -> dict[str, Any]:
        # The backends use disjoint keys, so one flat dict round-trips through resume_state.
        state: dict[str, Any] = {}
        for logger in self.loggers:
            state.update(logger.state_dict())
        return state

    def finalize(self, status: str = "success") -> None:
        # Close every backend even if one fails, then report the first failure.
        errors: list[BaseException] = []
        for logger in self.loggers:
            try:
                logger.finalize(status)
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]
