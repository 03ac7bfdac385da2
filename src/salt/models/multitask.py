"""How the task losses make the training loss (`model.loss_mode`):

- `weighted_sum` (default, GN2): sum over tasks of `weight * loss`;
- `GLS`: the geometric mean of the task losses, (L_1 ... L_n)^(1/n), as the old tool's
  `loss_mode: GLS` (its GN3 configs). Its gradient, G/n sum_i grad(L_i)/L_i, weighs each
  task by its inverse loss: the tasks are balanced by themselves, and a task weight would only
  scale the whole loss, so the old tool refuses weights other than 1 with it, and so does
  `ModelConfig.check`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

LOSS_MODES = ("weighted_sum", "GLS")
# the old tool's names, read as ours
LOSS_MODE_ALIASES = {"wsum": "weighted_sum", "gls": "GLS"}


def weighted_sum(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    total: Tensor | None = None
    for name, loss in losses.items():
        term = weights[name] * loss
        total = term if total is None else total + term
    assert total is not None, "no task loss"
    return total


def geometric_mean(losses: Mapping[str, Tensor]) -> Tensor:
    """exp(mean(log L_i)) in float32: the product of the losses would under- or overflow in
    fp16 or bf16 (four losses of 1e-3 multiply to 0 in fp16). A loss of exactly 0 (a task
    without a target in the batch) counts as the smallest normal float32: the mean stays
    finite and so does every gradient, where 0^(1/n) would give NaN gradients."""
    floor = torch.finfo(torch.float32).tiny
    logs = torch.stack([loss.float().clamp_min(floor).log() for loss in losses.values()])
    return logs.mean().exp()


def total_loss(
    losses: Mapping[str, Tensor], weights: Mapping[str, float], mode: str = "weighted_sum"
) -> Tensor:
    """The training loss of the task `losses` under `mode` (one of LOSS_MODES)."""
    if mode == "GLS":
        return geometric_mean(losses)
    return weighted_sum(losses, weights)
