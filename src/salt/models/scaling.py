"""Regression targets in the units the head learns: divided by a denominator, then scaled.

A regression task's target `y` of one object (a jet, a track...) becomes, in this order,

1. `r = y / d`, with `d` the target's denominator, a variable of the same object
   (`target_denominators`, e.g. the jet's calibrated pt for a truth pt: the head learns a
   response near 1 whatever the jet's pt);
2. `u = f(r)`, the target's scaling (`scaling.<target>`), the old tool's
   `RegressionTargetScaler` operations:

   - `log`:    `f(r) = log(r * x_scale + x_off) * op_scale + op_off`
   - `linear`: `f(r) = (r * x_scale + x_off) * op_scale + op_off`

   A mean/std normalisation (the old tool's `norm_params`) is `linear` with `x_off: -mean`
   and `op_scale: 1/std`.

The head predicts `u`; a prediction goes back with `y = d * f^-1(u)`. A Gaussian head's
width `s` (in `u`) becomes `d * |df^-1/du| * s` at the predicted mean: the delta method, exact
for `linear`, to first order for `log`. A target whose `log` argument is not positive scales
to NaN and is left out of the loss, as a missing target is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch import Tensor

from salt.errors import ModelConfigError

SCALING_OPS = ("log", "linear")


@dataclass
class ScalingConfig:
    """`model.tasks.<name>.scaling.<target>`: `f(r) = op(r * x_scale + x_off) * op_scale +
    op_off` (see the module doc); both scales must be non-zero, so that `f` is invertible."""

    op: str = MISSING  # log | linear
    x_scale: float = 1.0
    x_off: float = 0.0
    op_scale: float = 1.0
    op_off: float = 0.0

    def check(self, where: str) -> None:
        if self.op not in SCALING_OPS:
            raise ModelConfigError(
                f"{where}.op={self.op}: expected one of {', '.join(SCALING_OPS)}"
            )
        for key in ("x_scale", "x_off", "op_scale", "op_off"):
            value = getattr(self, key)
            if not math.isfinite(value) or (key.endswith("scale") and value == 0):
                kind = "a finite number other than 0" if key.endswith("scale") else "a number"
                raise ModelConfigError(
                    f"{where}.{key}={value}: expected {kind} (the scaling must be invertible)"
                )


class TargetScaler:
    """The targets of one task to the head's units and back (see the module doc).

    `ops[k]` is None for a target without scaling. Not a module and no tensors: the parameters
    come from the config, so a checkpoint holds the same tensors with or without scaling.
    """

    def __init__(
        self, targets: Sequence[str], scaling: Mapping[str, ScalingConfig] | None = None
    ) -> None:
        scaling = scaling or {}
        self.ops = [scaling.get(t) for t in targets]

    def scale(self, values: Tensor) -> Tensor:
        """`f` on `values[..., K]` (one column per target; the caller passes fp32 or wider)."""
        columns = [_forward(values[..., k], op) for k, op in enumerate(self.ops)]
        return torch.stack(columns, dim=-1)

    def inverse(self, values: Tensor) -> Tensor:
        """`f^-1` on `values[..., K]`."""
        columns = [_inverse(values[..., k], op) for k, op in enumerate(self.ops)]
        return torch.stack(columns, dim=-1)

    def inverse_slope(self, values: Tensor) -> Tensor:
        """`|df^-1/du|` at `values[..., K]`, for the delta method."""
        columns = [_inverse_slope(values[..., k], op) for k, op in enumerate(self.ops)]
        return torch.stack(columns, dim=-1)


def _forward(x: Tensor, op: ScalingConfig | None) -> Tensor:
    if op is None:
        return x
    inner = x * op.x_scale + op.x_off
    if op.op == "log":
        inner = torch.log(inner)  # NaN (not positive) or -inf (0): left out of the loss
    return inner * op.op_scale + op.op_off


def _inverse(u: Tensor, op: ScalingConfig | None) -> Tensor:
    if op is None:
        return u
    inner = (u - op.op_off) / op.op_scale
    if op.op == "log":
        inner = torch.exp(inner)
    return (inner - op.x_off) / op.x_scale


def _inverse_slope(u: Tensor, op: ScalingConfig | None) -> Tensor:
    if op is None:
        return torch.ones_like(u)
    slope = 1.0 / abs(op.op_scale * op.x_scale)
    if op.op == "log":  # d/du exp((u - op_off) / op_scale) / x_scale
        return torch.exp((u - op.op_off) / op.op_scale) * slope
    return torch.full_like(u, slope)
