"""The run: everything the loop needs, and what a checkpoint holds.

Each resumable part (model, optimizer, learning-rate schedule, grad scaler, data position,
counters, logger) has `state_dict()`/`load_state_dict()`; a checkpoint is the dict of them
(`Run.state_dict`), with every rank's random generators and the model config beside, so a
run continues bit for bit from any checkpoint, at an epoch boundary or mid-epoch.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salt.data.dataset import BatchLoader
from salt.errors import ConfigError
from salt.models.tagger import ModelConfig
from salt.schema import TrainConfig
from salt.signals import Catch
from salt.tracking import Logger
from salt.training import checkpoint as ckpt
from salt.training.device_batches import DeviceBatches
from salt.training.distributed import DistInfo, all_gather_object, broadcast_object
from salt.training.kept import Kept
from salt.training.loss_window import LossWindow
from salt.training.monitor import Monitor, continue_best
from salt.training.optim import Schedule
from salt.utils.atomic import atomic_path
from salt.utils.nested import flatten

log = logging.getLogger("salt")


@dataclass
class Counters:
    """Where the run is: resumable like everything else."""

    epoch: int = 0
    step: int = 0
    epoch_complete: bool = False
    best_val_loss: float = math.inf  # the best value of the monitored metric so far
    monitor: str = ""  # which metric that is (salt.training.monitor.Monitor.name)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "epoch_complete": self.epoch_complete,
            "best_val_loss": self.best_val_loss,
            "monitor": self.monitor,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.epoch_complete = bool(state["epoch_complete"])
        self.best_val_loss = float(state["best_val_loss"])
        self.monitor = str(state.get("monitor", ""))  # "": a checkpoint from before it


@dataclass
class Run:
    """Everything the loop needs, built once by `salt.training.setup.setup`."""

    cfg: TrainConfig
    dist: DistInfo
    model: nn.Module  # the DDP wrapper when distributed
    tagger: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    scaler: torch.amp.GradScaler
    train_loader: BatchLoader
    val_loader: BatchLoader
    counters: Counters
    logger: Logger  # built with the checkpoint's logger state (its history is copied)
    run_dir: Path | None
    total_steps: int
    autocast_dtype: torch.dtype | None
    monitor: Monitor = field(default_factory=Monitor)  # names the epoch checkpoints, picks the best
    stop: Catch | None = None  # the stop request (salt.signals.stop_request)
    losses: LossWindow = field(default_factory=LossWindow)  # read every log_every_n_steps
    kept: Kept = field(default_factory=Kept)  # the last complete checkpoint, for a stop's line

    def __post_init__(self) -> None:
        # the loaders as the step sees them: on the device, the next batch already copied
        self.train_batches = DeviceBatches(self.train_loader, self.dist.device)
        self.val_batches = DeviceBatches(self.val_loader, self.dist.device)

    def stateful(self) -> dict[str, Any]:
        """The parts a checkpoint restores, by checkpoint key, in the order they load."""
        return {
            "model": self.tagger,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,  # after the optimizer: it sets the groups' rates
            "scaler": self.scaler,
            "data": self.train_batches,
            "counters": self.counters,
        }

    def state_dict(self, rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        rng_per_rank = rng_per_rank or [ckpt.rng_state()]
        return {
            **{name: part.state_dict() for name, part in self.stateful().items()},
            "logger": self.logger.state_dict(),
            "rng": rng_per_rank[0],
            # every DDP rank's generators: dropout draws differ per rank (batch shapes differ)
            "rng_per_rank": rng_per_rank,
            "config": self.cfg.model.plain(),
            "optimizer_name": self.cfg.optimizer.name,  # its state fits no other optimizer
        }

    def load_state_dict(self, state: Mapping[str, Any], path: Path) -> None:
        """Continue from a checkpoint's `state` (read from `path`); its model config was
        checked against this run's when it was read (`check_model_config`)."""
        for name, part in self.stateful().items():
            part.load_state_dict(state[name])
        for group in self.optimizer.param_groups:  # as configured now (resume may change it)
            group["weight_decay"] = self.cfg.optimizer.weight_decay
        continue_best(self.counters, self.monitor)  # trainer.monitor may change too
        self._load_rng(state, path)
        log.info(
            "salt: resumed from %s at epoch %d, step %d",
            path,
            self.counters.epoch,
            self.counters.step,
        )

    def _load_rng(self, state: Mapping[str, Any], path: Path) -> None:
        per_rank = state.get("rng_per_rank")
        if per_rank and len(per_rank) == self.dist.world_size:
            ckpt.set_rng_state(per_rank[self.dist.rank])
        else:
            if self.dist.world_size > 1:
                log.warning(
                    "salt: %s holds the random state of %d rank(s), this run has %d; every rank "
                    "continues from rank 0's (not bit for bit)",
                    path,
                    len(per_rank or [None]),
                    self.dist.world_size,
                )
            ckpt.set_rng_state(state["rng"])


# model keys that change how the tagger is computed, not what: free to differ on resume
SAME_FUNCTION_KEYS = frozenset({"attention.backend"})


def check_model_config(saved: Any, current: Any, path: Path) -> None:
    """A checkpoint only fits the model config it was trained with: name what differs. Both
    are compared as the schema reads them, so a checkpoint saved before a key had a default
    written out (or before the typed configs) still fits."""
    a, b = (flatten(_as_read(c)) if isinstance(c, Mapping) else {} for c in (saved, current))
    differing = sorted(
        k
        for k in a.keys() | b.keys()
        if a.get(k, "<absent>") != b.get(k, "<absent>") and k not in SAME_FUNCTION_KEYS
    )
    if differing:
        shown = "; ".join(
            f"model.{k}: checkpoint {a.get(k, '<absent>')!r}, config {b.get(k, '<absent>')!r}"
            for k in differing[:10]
        )
        more = f" (and {len(differing) - 10} more)" if len(differing) > 10 else ""
        raise ckpt.CheckpointError(
            f"{path}: checkpoint was trained with a different model config: {shown}{more}. "
            "Resume with that run's config.yaml (resume=<run dir> does so)."
        )


def check_optimizer(state: Mapping[str, Any], current: str, trainable: int, path: Path) -> None:
    """A checkpoint's optimizer state (its moments) only continues the optimizer that made it,
    over the same parameters (`finetune.freeze` leaves some out); a checkpoint from before
    the name was saved was trained with AdamW."""
    saved = state.get("optimizer_name") or "adamw"
    if saved != current:
        raise ckpt.CheckpointError(
            f"{path}: checkpoint was trained with optimizer.name={saved}, the config has "
            f"{current}; resume with optimizer.name={saved}, or start a new run from its "
            f"weights with finetune.ckpt_path={path}."
        )
    groups = (state.get("optimizer") or {}).get("param_groups") or []
    count = sum(len(group["params"]) for group in groups)
    if groups and count != trainable:
        raise ckpt.CheckpointError(
            f"{path}: checkpoint's optimizer trained {count} parameter tensors, this run "
            f"trains {trainable}: other parameters are frozen (finetune.freeze); resume with "
            "the run's own finetune settings."
        )


def _as_read(model_cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    try:
        return ModelConfig.read(model_cfg).plain()
    except ConfigError:
        return model_cfg  # compared as stored: the difference is named below


def save(run: Run, name: str, also_last: bool = True) -> None:
    """Write a checkpoint (rank 0). Every rank must call it: the ranks' RNG states are gathered,
    and a failed write (a full disk) stops every rank, not only rank 0."""
    if run.run_dir is None:
        return
    run.losses.read(keep=True)  # no checkpoint after a step with a non-finite loss
    rng = all_gather_object(ckpt.rng_state(), what="the random states for a checkpoint")
    failure, cause = None, None
    run.kept.saving = True
    if run.dist.is_main:
        try:
            write_checkpoint(run, name, rng, also_last)
        except ckpt.CheckpointWriteError as err:
            # a full disk or quota: stop (every later save would fail too), say what is safe
            failure = f"training stopped at step {run.counters.step}: {err}. {resume_hint(run)}"
            cause = err
    # the other ranks would wait for rank 0 forever
    failure = broadcast_object(failure, what="the result of rank 0's checkpoint write")
    if failure is not None:
        raise ckpt.CheckpointWriteError(failure) from cause
    if not run.dist.is_main:  # rank 0 noted it as soon as the file was complete
        first = ckpt.LAST if also_last else name
        run.kept.saved(run.run_dir / "ckpts" / first, run.counters.step)


def write_checkpoint(run: Run, name: str, rng: list[dict[str, Any]], also_last: bool) -> None:
    """last.ckpt first, then its copy under the epoch's name: a write cut short in between
    (a second Ctrl-C, a kill) leaves last.ckpt, what resume picks, the newest state."""
    assert run.run_dir is not None
    ckpt_dir = run.run_dir / "ckpts"
    first = ckpt.LAST if also_last else name
    ckpt.save_checkpoint(run.state_dict(rng), ckpt_dir / first)
    run.kept.saved(ckpt_dir / first, run.counters.step)
    if first != name:
        # a copy, not a second serialisation: every file under a final name is complete
        try:
            with atomic_path(ckpt_dir / name) as tmp:
                shutil.copyfile(ckpt_dir / first, tmp)
        except OSError as err:
            raise ckpt.CheckpointWriteError(
                f"could not write checkpoint {ckpt_dir / name}: {err.strerror or err}; "
                f"{ckpt_dir / first} was written and is complete"
            ) from err


def resume_hint(run: Run) -> str:
    """Where the run can continue from after a failed save: its own latest checkpoint, else
    the checkpoint it was started from."""
    assert run.run_dir is not None
    latest = ckpt.latest_checkpoint(run.run_dir / "ckpts")
    if latest is not None:
        return f"Free space, then continue from {latest} with resume={run.run_dir}"
    started = run.cfg.ckpt_path
    if started:
        source = Path(str(started))
        return (
            f"This run saved no checkpoint yet; free space, then continue from {source} with "
            f"resume={source.parent.parent}"
        )
    return "This run saved no checkpoint yet; free space and start it again"
