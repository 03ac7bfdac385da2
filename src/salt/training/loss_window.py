"""The training losses of the last steps, kept on the device until they are read.

Reading a loss on the host (``float(loss)``, ``bool(torch.isfinite(loss))``) makes the host
wait for the GPU to finish the step, so the next step cannot be queued behind it. The loop
adds every step's losses here (one small device op) and reads them every
``logger.log_every_n_steps`` and before each checkpoint: one host sync per window instead of
one or more per step. A non-finite loss is still found and named by its step and task; the
optimizer skips such a step on the device (see ``salt.training.loop.optimizer_step``), so no
NaN reaches the weights in between.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from salt.errors import TrainingError


@dataclass(frozen=True)
class WindowSummary:
    """The mean of every loss over the window's steps."""

    means: dict[str, float]


class LossWindow:
    """Step losses `{name: scalar tensor}` since the last `read()`."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._rows: list[Tensor] = []  # one [len(names)] tensor per step, on the device
        self._steps: list[tuple[int, int]] = []  # (step, epoch) of each row

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, losses: Mapping[str, Tensor], step: int, epoch: int) -> None:
        names = list(losses)
        if self._rows and names != self._names:
            raise ValueError(f"loss names changed within a window: {self._names} -> {names}")
        self._names = names
        self._rows.append(torch.stack([losses[k].detach().float() for k in names]))
        self._steps.append((step, epoch))

    def read(self, keep: bool = False) -> WindowSummary:
        """The means of the window (one host sync), then an empty window (`keep`: the steps
        stay for the next read, e.g. a check before a checkpoint between two log steps).

        Raises `TrainingError` naming the first step with a non-finite loss and its task(s).
        """
        if not self._rows:
            return WindowSummary({})
        table = torch.stack(self._rows).cpu()  # [steps, losses]: the window's one sync
        names, steps = self._names, self._steps
        if not keep:
            self._rows, self._steps = [], []
        finite = torch.isfinite(table)
        if not bool(finite.all()):
            first = int((~finite).any(dim=1).int().argmax())
            step, epoch = steps[first]
            values = dict(zip(names, table[first].tolist(), strict=True))
            bad = [k for k in names if k != "loss" and not math.isfinite(values[k])]
            raise TrainingError(
                f"non-finite loss at step {step} (epoch {epoch}) in task(s) "
                f"{', '.join(bad) or 'loss'}: {[values[k] for k in bad or ['loss']]}. "
                "Stopping; the step was not applied and the last good checkpoint is kept. "
                "Check the inputs (data.nan_policy) and the learning rate."
            )
        means = dict(zip(names, table.double().mean(dim=0).tolist(), strict=True))
        return WindowSummary(means)
