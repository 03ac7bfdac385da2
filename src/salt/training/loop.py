"""The training loop: set-up, steps, validation, checkpoints; top to bottom, small functions.

``fit(cfg, dist)`` runs one training on one rank. Everything resumable (model, optimizer,
scheduler, grad scaler, data position, RNG, counters, logger) goes into each checkpoint, so a run
continues bit for bit from any checkpoint, at an epoch boundary or in the middle of an epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from salt import models
from salt.data.build import DataFiles, check_no_truth_inputs, make_loader, resolve_files
from salt.data.dataset import Batch, BatchLoader
from salt.data.ftag import load_yaml_dict
from salt.data.staging import stage, staging_root
from salt.data.workers import loader_options, resolve_num_workers
from salt.errors import ConfigError, Interrupted, StagingError
from salt.provenance import check_clean, collect_metadata, git_state, push_tag, seed_everything
from salt.schema import TrainConfig, read_train_config
from salt.signals import Catch, stop_request
from salt.tracking import Logger, NullLogger, build_logger
from salt.training import checkpoint as ckpt
from salt.training.config import TrainerConfig
from salt.training.device_batches import DeviceBatch, DeviceBatches
from salt.training.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    detect_environment,
)
from salt.training.loss_window import LossWindow
from salt.training.optim import Schedule, adamw
from salt.training.run_dir import (
    create_run_dir,
    remember_job,
    requeued_run_dir,
    write_run_files,
)
from salt.utils.atomic import atomic_path
from salt.utils.nested import flatten
from salt.utils.typed_config import as_plain

log = logging.getLogger("salt")


@dataclass
class Counters:
    """Where the run is: resumable like everything else."""

    epoch: int = 0
    step: int = 0
    epoch_complete: bool = False
    best_val_loss: float = math.inf

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "epoch_complete": self.epoch_complete,
            "best_val_loss": self.best_val_loss,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.epoch_complete = bool(state["epoch_complete"])
        self.best_val_loss = float(state["best_val_loss"])


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`setup`."""

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
    logger: Logger
    run_dir: Path | None
    total_steps: int
    autocast_dtype: torch.dtype | None
    monitor: str = "val/loss"  # names the epoch checkpoints, picks the best (trainer.monitor)
    stop: Catch | None = None  # the stop request (salt.signals.stop_request)
    losses: LossWindow = field(default_factory=LossWindow)  # read every log_every_n_steps

    def __post_init__(self) -> None:
        # the loaders as the step sees them: on the device, the next batch already copied
        self.train_batches = DeviceBatches(self.train_loader, self.dist.device)
        self.val_batches = DeviceBatches(self.val_loader, self.dist.device)


# ---- set-up -------------------------------------------------------------------------------
AUTOCAST = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}  # trainer.precision


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def ranks_sharing_cpus(dist: DistInfo) -> int:
    """Training processes sharing this process's CPUs: Slurm gives each task (srun, submitit)
    its own; ranks started by spawn or torchrun share the node's."""
    launch = detect_environment()
    if launch is None or launch["source"] in ("slurm", "submitit"):
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))


@contextlib.contextmanager
def stage_once_per_node(files: DataFiles, temp_root: str, dist: DistInfo) -> Iterator[DataFiles]:
    """`stage` the data on each node once: its first rank copies (and checks the free space,
    so ranks cannot race for it), the node's other ranks wait and read the same copies. A
    failure on any node is every rank's error. The copies are removed after every rank of the
    node is done with them (on an error, at once: the run is ending)."""
    if not dist.distributed:
        with stage(files, temp_root, progress=dist.is_main) as staged:
            yield staged
        return
    with contextlib.ExitStack() as copies:
        result: DataFiles | str | None = None  # the copies, or the node's error
        if dist.local_rank == 0:
            try:
                result = copies.enter_context(stage(files, temp_root, progress=dist.is_main))
            except StagingError as err:
                result = f"{socket.gethostname()}: {err}"
        node = socket.gethostname()
        gathered = all_gather_object((node, dist.local_rank, result))  # the copies are done
        failures = [r for _, _, r in gathered if isinstance(r, str)]
        if failures:
            raise StagingError(failures[0])
        staged = next(r for n, lr, r in gathered if n == node and lr == 0)
        assert isinstance(staged, DataFiles)
        yield staged
        barrier()  # every rank is done reading before the node's first rank removes them


def build_loaders(cfg: TrainConfig, files: DataFiles, dist: DistInfo) -> tuple[BatchLoader, ...]:
    data = cfg.data
    on_gpu = dist.device.type == "cuda"
    options = loader_options(data, on_gpu)
    variables, labels = models.input_variables(cfg.model), models.label_specs(cfg.model)
    check_no_truth_inputs(variables, labels, data.allow_truth_inputs)
    common = {
        "variables": variables,
        "labels": labels,
        "seed": cfg.seed,
        "rank": dist.rank,
        "world_size": dist.world_size,
        "pin_memory": options["pin_memory"],
        "num_workers": resolve_num_workers(
            data.num_workers, on_gpu=on_gpu, world_size=ranks_sharing_cpus(dist)
        ),
    }
    train = make_loader(
        data, files.train, files.norm_dict, num_jets=data.num_train, train=True, **common
    )
    val = make_loader(
        data, files.val, files.norm_dict, num_jets=data.num_val, train=False, **common
    )
    return train, val


def planned_steps(trainer: TrainerConfig, batches_per_epoch: int) -> int:
    """The optimizer steps the run is planned for (the length of the learning-rate cycle)."""
    if trainer.fast_dev_run:
        return trainer.fast_dev_run
    if trainer.max_epochs == -1:
        return trainer.max_steps
    steps = trainer.max_epochs * batches_per_epoch
    return min(steps, trainer.max_steps) if trainer.max_steps > 0 else steps


def setup(
    config: TrainConfig | DictConfig, dist: DistInfo, resources: contextlib.ExitStack | None = None
) -> Run:
    """Build the run; with ``resources``, data staged to ``data.move_files_temp`` stays until
    it closes (without, the files are read in place)."""
    cfg = read_train_config(config)  # once; everything below reads its typed fields
    fast_dev_run = cfg.trainer.fast_dev_run
    state = git_state()
    if not fast_dev_run:
        check_clean(state, cfg.force)
    seed_everything(cfg.seed)

    if dist.is_main:
        files = resolve_files(cfg.data)
    barrier()  # the sample is written once, by rank 0
    files = source_files = resolve_files(cfg.data)
    temp_root = staging_root(cfg.data.move_files_temp)
    if temp_root and resources is not None:
        files = resources.enter_context(stage_once_per_node(files, temp_root, dist))
    train_loader, val_loader = build_loaders(cfg, files, dist)

    class_dict = load_yaml_dict(files.class_dict, "class_dict") if files.class_dict else None
    tagger = models.build_tagger(cfg.model, class_dict).to(dist.device)
    monitor = monitored(cfg.trainer.monitor, tagger)
    amp = AUTOCAST[cfg.trainer.precision]
    compile_backend = cfg.trainer.compile_backend
    if compile_backend is not None:
        with autocast(dist.device, amp):
            tagger.compile_for(tagger.layout(dist.device), compile_backend)
    model: nn.Module = tagger
    if dist.world_size > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(tagger, device_ids=ids)

    total_steps = planned_steps(cfg.trainer, len(train_loader))
    optimizer = adamw(tagger.parameters(), cfg.optimizer)
    scheduler = Schedule(optimizer, cfg.optimizer, total_steps)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp is torch.float16)

    counters = Counters()
    resume_from = cfg.ckpt_path
    # a job requeued by Slurm (preemption, time limit) continues its own run directory
    requeued = None if fast_dev_run else requeued_run_dir(cfg)
    if requeued is not None:
        resume_from = ckpt.latest_checkpoint(requeued / "ckpts") or resume_from
        if dist.is_main:  # the killed attempt's partial writes only hold disk space
            ckpt.remove_temp_files(requeued / "ckpts")
        log.info("salt: requeued job continues %s from %s", requeued, resume_from)
    loaded = ckpt.load_checkpoint(resume_from, map_location=dist.device) if resume_from else None

    run_dir = None
    logger: Logger = NullLogger()
    if not fast_dev_run:
        if dist.is_main:
            run_dir = requeued or create_run_dir(cfg)
            remember_job(cfg, run_dir)
        run_dir = broadcast_object(run_dir)
        if dist.is_main:
            num_params = models.count_parameters(tagger)
            meta = collect_metadata(
                state=state,
                seed=cfg.seed,
                num_params=num_params,
                data_files={
                    "train": {
                        "path": [str(p) for p in source_files.train],
                        "num_jets": train_loader.dataset.num_jets,
                    },
                    "val": {
                        "path": [str(p) for p in source_files.val],
                        "num_jets": val_loader.dataset.num_jets,
                    },
                },
                extra={
                    "resumed_from": str(resume_from) if resume_from else None,
                    "world_size": dist.world_size,
                },
            )
            write_run_files(run_dir, cfg, meta, source_files)
            logger = build_logger(
                cfg.logger,
                run_dir,
                run_name=run_dir.name,
                resume_state=(loaded or {}).get("logger"),
            )
            logger.log_hyperparams(as_plain(cfg))
            logger.log_metadata({"git_commit": state.commit, "num_params": num_params})
            if cfg.tag and requeued is None:  # a requeued job tagged on its first start
                push_tag(state, run_dir.name, cfg.tag_remote, force=cfg.force)
            log.info("salt: run directory %s (%d parameters)", run_dir, num_params)

    run = Run(
        cfg,
        dist,
        model,
        tagger,
        optimizer,
        scheduler,
        scaler,
        train_loader,
        val_loader,
        counters,
        logger,
        run_dir,
        total_steps,
        amp,
        monitor,
    )
    if loaded is not None:
        restore(run, loaded, Path(resume_from))
    return run


# ---- checkpoints --------------------------------------------------------------------------
def checkpoint_state(run: Run, rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rng_per_rank = rng_per_rank or [ckpt.rng_state()]
    return {
        "model": run.tagger.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "data": run.train_batches.state_dict(),
        "rng": rng_per_rank[0],
        # every DDP rank's generators: dropout draws differ per rank (different batch shapes)
        "rng_per_rank": rng_per_rank,
        "counters": run.counters.state_dict(),
        "logger": run.logger.state_dict(),
        "config": run.cfg.model.plain(),
    }


# model keys that change how the tagger is computed, not what: free to differ on resume
SAME_FUNCTION_KEYS = frozenset({"attention.backend"})


def check_model_config(saved: Any, current: Any, path: Path) -> None:
    """A checkpoint only fits the model config it was trained with: name what differs."""
    a, b = (flatten(c) if isinstance(c, Mapping) else {} for c in (saved, current))
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


def restore(run: Run, state: Mapping[str, Any], path: Path) -> None:
    check_model_config(state.get("config"), run.cfg.model.plain(), path)
    run.tagger.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # as configured now (resume may change it)
        group["weight_decay"] = run.cfg.optimizer.weight_decay
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.train_batches.load_state_dict(state["data"])
    run.counters.load_state_dict(state["counters"])
    per_rank = state.get("rng_per_rank")
    if per_rank and len(per_rank) == run.dist.world_size:
        ckpt.set_rng_state(per_rank[run.dist.rank])
    else:
        if run.dist.world_size > 1:
            log.warning(
                "salt: %s holds the random state of %d rank(s), this run has %d; every rank "
                "continues from rank 0's (not bit for bit)",
                path,
                len(per_rank or [None]),
                run.dist.world_size,
            )
        ckpt.set_rng_state(state["rng"])
    log.info(
        "salt: resumed from %s at epoch %d, step %d", path, run.counters.epoch, run.counters.step
    )


def save(run: Run, name: str, also_last: bool = True) -> None:
    """Write a checkpoint (rank 0). Every rank must call it: the ranks' RNG states are gathered,
    and a failed write (a full disk) stops every rank, not only rank 0."""
    if run.run_dir is None:
        return
    run.losses.read(keep=True)  # no checkpoint after a step with a non-finite loss
    rng = all_gather_object(ckpt.rng_state())
    failure, cause = None, None
    if run.dist.is_main:
        try:
            write_checkpoint(run, name, rng, also_last)
        except ckpt.CheckpointWriteError as err:
            # a full disk or quota: stop (every later save would fail too), say what is safe
            failure = f"training stopped at step {run.counters.step}: {err}. {resume_hint(run)}"
            cause = err
    failure = broadcast_object(failure)  # the other ranks would wait for rank 0 forever
    if failure is not None:
        raise ckpt.CheckpointWriteError(failure) from cause


def write_checkpoint(run: Run, name: str, rng: list[dict[str, Any]], also_last: bool) -> None:
    assert run.run_dir is not None
    ckpt_dir = run.run_dir / "ckpts"
    ckpt.save_checkpoint(checkpoint_state(run, rng), ckpt_dir / name)
    if also_last and name != ckpt.LAST:
        # a copy, not a second serialisation: last.ckpt is always a complete checkpoint
        try:
            with atomic_path(ckpt_dir / ckpt.LAST) as tmp:
                shutil.copyfile(ckpt_dir / name, tmp)
        except OSError as err:
            raise ckpt.CheckpointWriteError(
                f"could not write checkpoint {ckpt_dir / ckpt.LAST}: {err.strerror or err}; "
                f"{ckpt_dir / name} was written and is complete"
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


# ---- one step -----------------------------------------------------------------------------
def forward(
    run: Run, batch: Batch, jets_per_size: list[int] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    with autocast(run.dist.device, run.autocast_dtype):
        return run.model(
            batch["inputs"], batch["pad_masks"], batch["labels"], jets_per_size=jets_per_size
        )


def optimizer_step(run: Run, loss: Tensor) -> None:
    """Step the optimizer unless `loss` is non-finite, decided on the device (no host sync).

    The fused AdamW skips its update where `found_inf` is non-zero, as GradScaler has it do
    for fp16 (a non-finite loss gives non-finite gradients, which the scaler finds itself).
    The loss window names the step when it is next read (salt.training.loss_window).
    """
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)
        run.scaler.update()
        return
    run.optimizer.found_inf = (~torch.isfinite(loss.detach())).float()  # type: ignore[attr-defined]
    try:
        run.optimizer.step()
    finally:
        del run.optimizer.found_inf  # type: ignore[attr-defined]


def train_step(run: Run, batch: DeviceBatch) -> dict[str, Tensor]:
    _, losses = forward(run, batch.tensors, batch.jets_per_size)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(losses["loss"]).backward()
    clip = run.cfg.trainer.gradient_clip_val
    if clip is not None:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.tagger.parameters(), float(clip), foreach=True)
    optimizer_step(run, losses["loss"])
    run.scheduler.step()
    return {k: v.detach() for k, v in losses.items()}


# ---- epochs -------------------------------------------------------------------------------
def limited(loader: BatchLoader, n: int) -> Iterator[Batch]:
    for i, batch in enumerate(loader):
        if n and i >= n:
            return
        yield batch


def progress(run: Run, total: int, desc: str):
    if not (run.dist.is_main and run.cfg.trainer.progress_bar):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, mininterval=1.0)


def train_epoch(run: Run) -> bool:
    """One (possibly resumed) epoch; True when it ran to its end."""
    c = run.counters
    run.model.train()
    run.train_batches.set_epoch(c.epoch)
    fast = run.cfg.trainer.fast_dev_run
    log_every = run.cfg.logger.log_every_n_steps if run.cfg.logger is not None else 50
    ckpt_every = run.cfg.trainer.ckpt_every_n_steps
    max_steps = run.cfg.trainer.max_steps
    total = fast or len(run.train_batches)
    bar = progress(run, total, f"epoch {c.epoch}")
    if bar is not None:
        bar.update(run.train_batches.consumed if not fast else 0)
    n_batches, n_jets, t0 = 0, 0, time.perf_counter()
    for batch in limited(run.train_batches, fast):
        losses = train_step(run, batch)
        run.losses.add(losses, c.step, c.epoch)  # stays on the device until read
        c.step += 1
        n_batches += 1
        n_jets += batch.num_jets
        if bar is not None:
            bar.update(1)
        if c.step % log_every == 0 or n_batches == total:
            window = run.losses.read()  # the one host sync of the window
            rate = n_jets * run.dist.world_size / (time.perf_counter() - t0)
            metrics = {
                f"train/{k}" if k == "loss" else f"train/{k}_loss": v
                for k, v in window.means.items()
            }
            metrics |= {"train/lr": run.scheduler.get_last_lr()[0], "train/jets_per_s": rate}
            run.logger.log_metrics(metrics, step=c.step, epoch=c.epoch)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", jets_s=f"{rate:.0f}")
            n_batches, n_jets, t0 = 0, 0, time.perf_counter()
        if ckpt_every and c.step % ckpt_every == 0 and not fast:
            save(run, ckpt.LAST, also_last=False)
        if 0 < max_steps <= c.step or stop_requested(run):
            break
    run.losses.read()  # a non-finite loss in the last steps stops the run here
    if bar is not None:
        bar.close()
    return fast > 0 or run.train_batches.consumed >= len(run.train_batches)


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    run.model.eval()
    fast = run.cfg.trainer.fast_dev_run
    jet_task = run.tagger.flavour_task()
    sums: dict[str, Tensor] = {}
    correct = torch.zeros((), device=run.dist.device, dtype=torch.float64)
    counted = torch.zeros((), device=run.dist.device, dtype=torch.float64)
    scores: list[Tensor] = []  # the jet flavour probabilities and classes, for rejections
    classes: list[Tensor] = []
    for device_batch in limited(run.val_batches, fast):
        batch, n = device_batch.tensors, device_batch.num_jets
        outputs, losses = forward(run, batch, device_batch.jets_per_size)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0) + v.double() * n
        sums["_jets"] = sums.get("_jets", 0) + n
        if jet_task is not None:
            target = batch["labels"][jet_task.input_type][jet_task.label]
            keep = target >= 0
            correct += ((outputs[jet_task.name].argmax(-1) == target) & keep).sum()
            counted += keep.sum()
            scores.append(jet_task.predict(outputs[jet_task.name]).float())
            classes.append(target)
    keys = sorted(sums)
    totals = all_reduce_sum(
        torch.stack(
            [torch.as_tensor(sums[k], dtype=torch.float64, device=run.dist.device) for k in keys]
            + [correct, counted]
        )
    )
    values = dict(zip([*keys, "_correct", "_counted"], totals.tolist(), strict=True))
    jets = max(values.pop("_jets"), 1.0)
    metrics = {
        f"val/{k}" if k == "loss" else f"val/{k}_loss": v / jets
        for k, v in values.items()
        if not k.startswith("_")
    }
    if jet_task is not None:
        metrics["val/jet_accuracy"] = values["_correct"] / max(values["_counted"], 1.0)
        metrics |= rejections_at(jet_task.class_names, scores, classes)
    return metrics


REJECTION_WP = 70  # % b-jet efficiency of the rejections logged per epoch


def rejections_at(
    class_names: list[str], scores: list[Tensor], classes: list[Tensor]
) -> dict[str, float]:
    """`val/<flavour>_rej_70`: background rejections at 70% b-jet efficiency (D_b with
    f_c = 0.2, as salt.evaluate) on every rank's validation jets; none without b, c, u."""
    from salt.evaluation.performance import REQUIRED_CLASSES, b_tagging_performance
    from salt.evaluation.predictions import JetScores

    if any(c not in class_names for c in REQUIRED_CLASSES):
        return {}
    local = (
        (torch.cat(scores).cpu().numpy(), torch.cat(classes).cpu().numpy())
        if scores
        else (np.zeros((0, len(class_names)), np.float32), np.zeros(0, np.int64))
    )
    parts = all_gather_object(local)  # every rank calls it, with or without jets
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


def monitored(name: str, tagger: models.Tagger) -> str:
    """The validation metric that names the epoch checkpoints and picks the best one
    (`trainer.monitor`; auto: the jet flavour task's loss, as the old tool, else the total)."""
    if name == "auto":
        task = tagger.flavour_task()
        return f"val/{task.name}_loss" if task is not None else "val/loss"
    losses = ["val/loss", *(f"val/{t}_loss" for t in tagger.tasks)]
    if name not in losses:
        raise ConfigError(f"trainer.monitor={name!r}: expected auto or one of {losses}.")
    return name


# under DDP the ranks agree on a stop every this many steps (each time: one host sync)
STOP_CHECK_EVERY_N_STEPS = 10


def stop_requested(run: Run, at_boundary: bool = False) -> bool:
    """Whether any rank received a stop signal (all ranks must stop at the same step).

    Under DDP, asked every `STOP_CHECK_EVERY_N_STEPS` steps (and at `at_boundary`, an epoch's
    end); alone, every step, for free.
    """
    flag = run.stop is not None and run.stop.last is not None
    if run.dist.world_size > 1:
        if not at_boundary and run.counters.step % STOP_CHECK_EVERY_N_STEPS:
            return False
        t = torch.tensor([float(flag)], device=run.dist.device)
        flag = bool(all_reduce_sum(t).item() > 0)
    return flag


def fit(cfg: TrainConfig | DictConfig, dist: DistInfo) -> Run:
    """Train as configured on this rank; returns the finished run (``run.run_dir`` is None for
    fast_dev_run)."""
    # the staged copies (a resource) are removed before the signal handlers are restored
    with stop_request() as stop, contextlib.ExitStack() as resources:
        run = setup(cfg, dist, resources)
        run.stop = stop
        return _fit(run)


def _fit(run: Run) -> Run:
    cfg, dist, c = run.cfg, run.dist, run.counters
    if c.epoch_complete:
        c.epoch, c.epoch_complete = c.epoch + 1, False
    fast = cfg.trainer.fast_dev_run
    max_epochs = 1 if fast else cfg.trainer.max_epochs
    if max_epochs == -1:  # no epoch limit: max_steps ends the run (TrainerConfig.check)
        max_epochs = math.inf
    max_steps = cfg.trainer.max_steps
    status = "failed"
    started, first_step = time.perf_counter(), c.step
    best: tuple[int, dict[str, float]] | None = None
    last: tuple[int, dict[str, float]] | None = None
    try:
        while c.epoch < max_epochs and not (0 < max_steps <= c.step):
            complete = train_epoch(run)
            if not complete and stop_requested(run, at_boundary=True):
                save(run, ckpt.LAST, also_last=False)
                barrier()  # no rank leaves (and gets the job killed) before rank 0 has saved
                status = "interrupted"
                run.logger.finalize(status)
                if run.stop is not None and run.stop.last is not None:
                    run.stop.pass_on(run.stop.last)  # under submitit: requeue the job
                raise Interrupted(run.stop.last or signal.SIGTERM, c.step, run.run_dir)
            metrics = validate(run)
            c.epoch_complete = complete
            if metrics[run.monitor] <= c.best_val_loss:
                best = (c.epoch, metrics)
            c.best_val_loss = min(c.best_val_loss, metrics[run.monitor])
            last = (c.epoch, metrics)
            run.logger.log_metrics(metrics | {"epoch": c.epoch}, step=c.step, epoch=c.epoch)
            run.logger.on_epoch_end(c.epoch)
            if dist.is_main:
                print(f"epoch {c.epoch}: {epoch_line(metrics)}", flush=True)
            if not fast:
                save(run, ckpt.checkpoint_name(c.epoch, metrics[run.monitor]))
            if not complete:
                break  # max_steps reached mid-epoch: a resume continues this epoch
            c.epoch, c.epoch_complete = c.epoch + 1, False
        status = "success"
    finally:
        run.logger.finalize(status)
    if dist.is_main and run.run_dir is not None:
        print(summary(run, time.perf_counter() - started, c.step - first_step, best, last))
    return run


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
