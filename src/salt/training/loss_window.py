"""The training losses of the last steps, kept on the device until they are read.

Reading a loss on the host (``float(loss)``, ``bool(torch.isfinite(loss))``) makes the host
wait for the GPU to finish the step, so the next step cannot be queued behind it. The loop
adds every step's losses here (one small device op) and reads them every
``logger.log_every_n_steps`` and before each checkpoint: one host sync per window instead of
one or more per step. A non-finite loss is still found and named by its step and task; the
optimizer skips such a step on the device (see ``salt.training.loop.optimizer_step``), so no
NaN reaches the weights in between.

Each step's gradient norm rides along in the same rows (the same one transfer) but is not a
loss: a non-finite norm is an fp16 step the GradScaler skipped, not an error, so it is left
out of the window's mean norm instead of stopping the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from salt.errors import TrainingError
from salt.training.distributed import all_gather_object, get_rank, ranks_where


@dataclass(frozen=True)
class WindowSummary:
    """The mean of every loss over the window's steps, and of the gradient norm over its
    steps with a finite one (NaN if none; None when the steps gave no norm)."""

    means: dict[str, float]
    grad_norm: float | None = None


class LossWindow:
    """Step losses `{name: scalar tensor}` since the last `read()`."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._rows: list[Tensor] = []  # one [len(names)] tensor per step, on the device
        self._steps: list[tuple[int, int]] = []  # (step, epoch) of each row
        self._with_norm = False  # the rows end with the step's gradient norm

    def __len__(self) -> int:
        return len(self._rows)

    def add(
        self,
        losses: Mapping[str, Tensor],
        step: int,
        epoch: int,
        grad_norm: Tensor | None = None,
    ) -> None:
        names, with_norm = list(losses), grad_norm is not None
        if self._rows and names != self._names:
            raise ValueError(f"loss names changed within a window: {self._names} -> {names}")
        if self._rows and with_norm != self._with_norm:
            raise ValueError("a step without a gradient norm in a window of steps with one")
        self._names, self._with_norm = names, with_norm
        values = [losses[k].detach().float() for k in names]
        if grad_norm is not None:
            values.append(grad_norm.detach().float().reshape(()))
        self._rows.append(torch.stack(values))
        self._steps.append((step, epoch))

    def read(self, keep: bool = False) -> WindowSummary:
        """The means of the window (one host sync), then an empty window (`keep`: the steps
        stay for the next read, e.g. a check before a checkpoint between two log steps).

        Raises `TrainingError` naming the first step with a non-finite loss and its task(s).
        Under DDP every rank reads at the same step and all stop when one rank's losses are
        not finite (one would otherwise wait for it in the next gradient all-reduce).
        """
        table = torch.stack(self._rows).cpu() if self._rows else None  # the window's one sync
        names, steps = self._names, self._steps
        norms = None
        if table is not None and self._with_norm:
            table, norms = table[:, :-1], table[:, -1]
        if not keep:
            self._rows, self._steps = [], []
        problem = None if table is None else _non_finite(table, names, steps)
        if ranks_where(problem is not None, "the check of the training losses"):
            problems = all_gather_object(problem, "the non-finite training losses")
            rank, first = next((r, p) for r, p in enumerate(problems) if p is not None)
            where = f" on rank {rank}" if len(problems) > 1 else ""
            err = TrainingError(
                f"non-finite loss{where} {first}. Stopping; the step was not applied and the "
                "last good checkpoint is kept. Check the inputs (data.nan_policy) and the "
                "learning rate."
            )
            err.reported = get_rank() != 0  # type: ignore[attr-defined]  # rank 0 says it
            raise err
        if table is None:
            return WindowSummary({})
        means = dict(zip(names, table.double().mean(dim=0).tolist(), strict=True))
        return WindowSummary(means, None if norms is None else _finite_mean(norms))


def _finite_mean(values: Tensor) -> float:
    """The mean of the finite values (on the host already); NaN if there is none."""
    finite = values[torch.isfinite(values)].double()
    return float(finite.mean()) if len(finite) else math.nan


def _non_finite(table: Tensor, names: list[str], steps: list[tuple[int, int]]) -> str | None:
    """Where the window's first non-finite loss is: step, epoch, task(s), values."""
    finite = torch.isfinite(table)
    if bool(finite.all()):
        return None
    first = int((~finite).any(dim=1).int().argmax())
    step, epoch = steps[first]
    values = dict(zip(names, table[first].tolist(), strict=True))
    bad = [k for k in names if k != "loss" and not math.isfinite(values[k])]
    return (
        f"at step {step} (epoch {epoch}) in task(s) {', '.join(bad) or 'loss'}: "
        f"{[values[k] for k in bad or ['loss']]}"
    )
