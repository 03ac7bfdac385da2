"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2): the
update is the sign of an interpolated momentum, with decoupled weight decay::

    c     = beta1 * m + (1 - beta1) * g
    theta = theta - lr * (sign(c) + weight_decay * theta)
    m     = beta2 * m + (1 - beta2) * g

The update, defaults (betas (0.9, 0.99), weight decay multiplied by the learning rate) and
state (``exp_avg``: m) of the lion-pytorch package the old tool trains with, computed with
foreach ops over all parameters at once instead of a loop over them. Like the fused AdamW it
skips a step on the device when ``found_inf`` is set (the loop's non-finite check, and
GradScaler's through ``_step_supports_amp_scaling``, which also hands over ``grad_scale`` to
unscale with): no step waits for the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class Lion(torch.optim.Optimizer):
    """Lion; ``betas[0]`` interpolates the update, ``betas[1]`` is the momentum's decay."""

    # GradScaler sets `grad_scale` and `found_inf` instead of unscaling and syncing itself
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"Lion: lr must be > 0, got {lr}")
        if not all(0.0 <= b <= 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"Lion: betas must be two numbers in [0, 1], got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None
    ) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params, grads, moments = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue  # frozen, or not in this step's graph
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                moments.append(state["exp_avg"])
            if params:
                beta1, beta2 = group["betas"]
                lion_update(
                    params,
                    grads,
                    moments,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                )
        return loss


def lion_update(
    params: list[Tensor],
    grads: list[Tensor],
    moments: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One Lion step of ``params`` (in place) and their ``moments``.

    ``grad_scale``: the loss scale the gradients still carry (GradScaler), divided out as
    GradScaler's unscale does. ``found_inf`` (a 0-dim tensor): where non-zero, parameters and
    moments keep their values, decided on the device; a non-finite gradient never reaches them.
    """
    if grad_scale is not None:
        # GradScaler's own unscale: times the reciprocal, computed in double
        grads = torch._foreach_mul(grads, grad_scale.double().reciprocal().float())
    # the interpolated momentum, then its sign: the update (the same arithmetic as lion-pytorch)
    update = torch._foreach_mul(moments, beta1)
    torch._foreach_add_(update, grads, alpha=1.0 - beta1)
    torch._foreach_sign_(update)
    if found_inf is None:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        torch._foreach_add_(params, update, alpha=-lr)
        torch._foreach_mul_(moments, beta2)
        torch._foreach_add_(moments, grads, alpha=1.0 - beta2)
        return
    # the same values out of place, kept only where the step is not skipped
    new_params = torch._foreach_mul(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(new_params, update, alpha=-lr)
    new_moments = torch._foreach_mul(moments, beta2)
    torch._foreach_add_(new_moments, grads, alpha=1.0 - beta2)
    keep = found_inf == 0
    for old, new in zip([*params, *moments], [*new_params, *new_moments], strict=True):
        old.copy_(torch.where(keep, new, old))
