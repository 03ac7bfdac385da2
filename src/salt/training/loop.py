"""The training loop: one step, epochs of steps, validation, checkpoints; top to bottom.

``fit(cfg, dist)`` runs one training on one rank: `salt.training.setup` builds the run
(`salt.training.state.Run`: the parts and what a checkpoint holds); each epoch trains, then
validates (`salt.training.report` for the rejections and what is printed) and saves. A stop
signal (Slurm's cancel or pre-timeout signal, Ctrl-C) saves at the next step boundary and
ends with `Interrupted`; a second Ctrl-C ends at once, with one line naming the last complete
checkpoint (`salt.training.kept`). Under DDP every rank makes the same collectives with the
same shapes whatever its share of the data (`salt.training.rank_failure` names a rank that
does not come). No step syncs with the host: losses and gradient norms stay on the device
until the `LossWindow` is read every `logger.log_every_n_steps`, and validation adds up its
sums and jet confusion counts on the device, read once at its end.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from salt.data.dataset import Batch, BatchLoader
from salt.errors import DataError, Interrupted, RankTimeoutError
from salt.schema import TrainConfig
from salt.signals import lost_interrupts_quiet, stop_request
from salt.training import checkpoint as ckpt
from salt.training.config import autocast
from salt.training.device_batches import DeviceBatch
from salt.training.distributed import DistInfo, all_reduce_sum, barrier, collective, ranks_where
from salt.training.kept import Kept
from salt.training.report import epoch_line, rejections_at, summary
from salt.training.setup import setup
from salt.training.state import Run, save


# ---- one step -----------------------------------------------------------------------------
def forward(
    run: Run,
    batch: Batch,
    jets_per_size: list[int] | dict[str, list[int]] | None = None,
    model: nn.Module | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``model``: the run's (the DDP wrapper under DDP) unless given."""
    with autocast(run.dist.device, run.autocast_dtype):
        return (model or run.model)(
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


def grad_norm(parameters: Iterable[Tensor]) -> Tensor:
    """The total (2-)norm of the gradients, on the device, as `clip_grad_norm_` computes it."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = getattr(nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is not None:
        return total_norm(grads, foreach=True)
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class StepResult(NamedTuple):
    losses: dict[str, Tensor]  # detached, on the device
    grad_norm: Tensor  # before clipping, unscaled under fp16; inf or NaN on a skipped step


def train_step(run: Run, batch: DeviceBatch) -> StepResult:
    _, losses = forward(run, batch.tensors, batch.jets_per_size)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(losses["loss"]).backward()
    # the gradients as the optimizer applies them (fp16: the scaler's step would unscale them
    # itself; unscaling here gives the same values, and the norm a user can read)
    run.scaler.unscale_(run.optimizer)
    clip = run.cfg.trainer.gradient_clip_val
    if clip is not None:
        norm = nn.utils.clip_grad_norm_(run.tagger.parameters(), float(clip), foreach=True)
    else:
        norm = grad_norm(run.tagger.parameters())
    optimizer_step(run, losses["loss"])
    run.scheduler.step()
    return StepResult({k: v.detach() for k, v in losses.items()}, norm.detach())


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
        lr = run.scheduler.get_last_lr()[0]  # the rate this step applies (a host float)
        with collective(f"the gradient all-reduce of step {c.step + 1}"):  # under DDP
            result = train_step(run, batch)
        # stays on the device until read; the norm is the same on every rank (after the
        # gradient all-reduce), and rank 0 logs it
        run.losses.add(result.losses, c.step, c.epoch, grad_norm=result.grad_norm)
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
            # the logged step's rate, not the next one's (the schedule moved after the step)
            metrics |= {"train/lr": lr, "train/jets_per_s": rate}
            if window.grad_norm is not None:  # the window's mean over its finite norms
                metrics["train/grad_norm"] = window.grad_norm
            run.logger.log_metrics(metrics, step=c.step, epoch=c.epoch)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", jets_s=f"{rate:.0f}")
            n_batches, n_jets, t0 = 0, 0, time.perf_counter()
        if ckpt_every and c.step % ckpt_every == 0 and not fast:
            save(run, ckpt.LAST, also_last=False)
        if 0 < max_steps <= c.step or stop_requested(run):
            break
        ctrl_c_again(run)
    else:  # every rank has the same number of batches; one left short would hang the others
        if not fast and run.train_batches.consumed < total:
            raise DataError(
                f"rank {run.dist.rank}: the training data of epoch {c.epoch} ended after "
                f"{run.train_batches.consumed} of {total} batches (were the files changed?)"
            )
    run.losses.read()  # a non-finite loss in the last steps stops the run here
    if bar is not None:
        bar.close()
    return fast > 0 or run.train_batches.consumed >= len(run.train_batches)


def confusion_counts(target: Tensor, predicted: Tensor, num_classes: int) -> Tensor:
    """``counts[t * num_classes + p]``: the jets of truth class t predicted as p (float64, on
    the device, no host sync); unlabelled jets (target < 0) are not counted.

    Not `torch.bincount`: on a GPU it reads the largest value on the host, a sync per batch.
    """
    n = num_classes
    labelled = target >= 0
    # an unlabelled jet goes to one extra bin, dropped: no boolean indexing (a sync)
    index = torch.where(labelled, target * n + predicted, n * n)
    counts = torch.zeros(n * n + 1, dtype=torch.float64, device=target.device)
    counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    return counts[:-1]


@dataclass
class Validation:
    """What a validation gives: the metrics, and the jet flavour task's confusion matrix
    (`counts[truth][predicted]`, over every rank's jets; None without a flavour task)."""

    metrics: dict[str, float]
    confusion: list[list[int]] | None = None
    class_names: list[str] | None = None


@torch.no_grad()
def validate(run: Run) -> Validation:
    """The validation metrics over every rank's share of the jets. Ranks may have different
    numbers of batches, or none (fewer batches than ranks): each adds its sums and counts
    (zeros without jets) to one all-reduce of the same shape on every rank."""
    run.model.eval()
    fast = run.cfg.trainer.fast_dev_run
    jet_task = run.tagger.flavour_task()
    names = sorted([*run.tagger.tasks, "loss"])  # the losses the tagger returns
    n_cls = len(jet_task.class_names) if jet_task is not None else 0
    # the jet-weighted sum of each loss, then the jets, then the jet confusion counts
    # (float64: exact to 2**53 jets; one all-reduce for all of them)
    sums = torch.zeros(len(names) + 1 + n_cls**2, device=run.dist.device, dtype=torch.float64)
    scores: list[Tensor] = []  # the jet flavour probabilities and classes, for rejections
    classes: list[Tensor] = []
    for device_batch in limited(run.val_batches, fast):
        ctrl_c_again(run)
        batch, n = device_batch.tensors, device_batch.num_jets
        # the tagger, not the DDP wrapper: no rank waits for another in a forward pass
        outputs, losses = forward(run, batch, device_batch.jets_per_size, run.tagger)
        sums[: len(names)] += torch.stack([losses[k].double() for k in names]) * n
        sums[len(names)] += n
        if jet_task is not None:
            target = batch["labels"][jet_task.input_type][jet_task.label]
            predicted = outputs[jet_task.name].argmax(-1)
            sums[len(names) + 1 :] += confusion_counts(target, predicted, n_cls)
            scores.append(jet_task.predict(outputs[jet_task.name]).float())
            classes.append(target)
    totals = all_reduce_sum(sums, f"the validation sums of epoch {run.counters.epoch}").tolist()
    jets = max(totals[len(names)], 1.0)
    metrics = {
        f"val/{k}" if k == "loss" else f"val/{k}_loss": total / jets
        for k, total in zip(names, totals, strict=False)
    }
    if jet_task is None:
        return Validation(metrics)
    flat = [round(v) for v in totals[len(names) + 1 :]]
    confusion = [flat[t * n_cls : (t + 1) * n_cls] for t in range(n_cls)]
    correct = sum(confusion[t][t] for t in range(n_cls))
    metrics["val/jet_accuracy"] = correct / max(sum(flat), 1)
    metrics |= rejections_at(jet_task.class_names, scores, classes)
    return Validation(metrics, confusion, list(jet_task.class_names))


def ctrl_c_again(run: Run) -> None:
    """A second Ctrl-C raises KeyboardInterrupt at once; one raised in a callback that ignores
    exceptions (a weakref's) is lost: stop here then, between steps."""
    if run.stop is not None and run.stop.again:
        raise KeyboardInterrupt


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
        flag = bool(ranks_where(flag, f"the stop check at step {run.counters.step}"))
    return flag


def stop(run: Run) -> NoReturn:
    """End the run for a stop signal (this rank's or another's), its state saved."""
    run.logger.finalize("interrupted")
    caught = run.stop.last if run.stop is not None else None  # None: another rank's signal
    if run.stop is not None and caught is not None and caught != signal.SIGINT:
        run.stop.pass_on(caught)  # under submitit: requeue the job (not Python's Ctrl-C
        # handler: it only raises KeyboardInterrupt)
    signum = caught or signal.SIGTERM
    raise Interrupted(signum, run.kept.stopped(signum, run.counters.step))


def fit(cfg: TrainConfig | DictConfig, dist: DistInfo) -> Run:
    """Train as configured on this rank; returns the finished run (``run.run_dir`` is None for
    fast_dev_run)."""
    kept, stop, run = Kept(), stop_request(), None
    try:
        # the staged copies (a resource) are removed before the signal handlers are restored
        with stop, lost_interrupts_quiet(), contextlib.ExitStack() as resources:
            run = setup(cfg, dist, resources, kept)
            run.stop = stop
            return _fit(run)
    except KeyboardInterrupt:  # a second Ctrl-C (the first asks for a stop at the next step)
        if getattr(cfg, "debug", False):
            raise
        step = run.counters.step if run is not None else None
        raise Interrupted(signal.SIGINT, kept.interrupted(step, again=bool(stop.caught))) from None
    except RankTimeoutError:
        if stop.last is None:
            raise
        # another rank left on the stop signal this one got too (e.g. in the data staging)
        step = run.counters.step if run is not None else None
        raise Interrupted(stop.last, kept.interrupted(step, again=False)) from None


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
        if stop_requested(run, at_boundary=True):  # a signal during set-up: nothing to save
            status = "interrupted"
            stop(run)
        while c.epoch < max_epochs and not (0 < max_steps <= c.step):
            complete = train_epoch(run)
            if not complete and stop_requested(run, at_boundary=True):
                save(run, ckpt.LAST, also_last=False)
                # no rank leaves (and gets the job killed) before rank 0 has saved
                barrier("the stop (the wait for rank 0's checkpoint)")
                status = "interrupted"
                stop(run)
            validation = validate(run)
            metrics = validation.metrics
            c.epoch_complete = complete
            value = run.monitor.value(metrics)  # trainer.monitor (salt.training.monitor)
            if run.monitor.improves(value, c.best_val_loss):
                best, c.best_val_loss = (c.epoch, metrics), value
            last = (c.epoch, metrics)
            run.logger.log_metrics(metrics | {"epoch": c.epoch}, step=c.step, epoch=c.epoch)
            if validation.confusion is not None and validation.class_names is not None:
                run.logger.log_confusion_matrix(
                    validation.confusion, validation.class_names, step=c.step, epoch=c.epoch
                )
            run.logger.on_epoch_end(c.epoch)
            if dist.is_main:
                print(f"epoch {c.epoch}: {epoch_line(metrics)}", flush=True)
            if not fast:
                save(run, run.monitor.checkpoint_name(c.epoch, value))
            if not complete:
                break  # max_steps reached mid-epoch: a resume continues this epoch
            c.epoch, c.epoch_complete = c.epoch + 1, False
        status = "success"
    finally:
        run.logger.finalize(status)
    if dist.is_main and run.run_dir is not None:
        print(summary(run, time.perf_counter() - started, c.step - first_step, best, last))
    return run
