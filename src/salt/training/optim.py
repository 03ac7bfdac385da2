"""The optimizer and its learning-rate schedule (the `optimizer` node), as the old tool's GN2:
AdamW (or Lion, `name: lion`, as the old tool's GN3 configs) with a one-cycle schedule,
initial -> max over `pct_start` of the steps, then cosine down to `end`. The schedule also
cycles the first beta of either (0.95 -> 0.85 -> 0.95, torch's OneCycleLR default), as the
old tool's."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from salt.training.lion import Lion
from salt.utils import typed_config as check

OPTIMIZERS = ("adamw", "lion")

log = logging.getLogger("salt")


@dataclass
class OptimizerConfig:
    """The `optimizer` node."""

    name: str = "adamw"  # adamw | lion (the old tool's names AdamW and lion are read too)
    initial: float = 1.0e-7  # learning rate at the first step
    max: float = 5.0e-4  # at pct_start of the steps
    end: float = 1.0e-5  # at the last step
    pct_start: float = 0.01
    weight_decay: float = 1.0e-5

    def check(self, where: str) -> None:
        self.name = self.name.lower()
        check.one_of(self.name, f"{where}.name", OPTIMIZERS)
        for key in ("initial", "max", "end"):
            if not getattr(self, key) > 0:
                raise check.ConfigError(f"{where}.{key} must be > 0, got {getattr(self, key)!r}")
        check.fraction(self.pct_start, f"{where}.pct_start")
        check.at_least(self.weight_decay, f"{where}.weight_decay", 0.0)


def adamw(parameters: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters, CPU and CUDA): it can also skip a step on
    the device (`found_inf`), which the loop's non-finite check relies on."""
    return torch.optim.AdamW(parameters, lr=cfg.max, weight_decay=cfg.weight_decay, fused=True)


def lion(parameters: Iterable[nn.Parameter], cfg: OptimizerConfig) -> Lion:
    """Lion with its defaults (betas 0.9, 0.99) and `weight_decay` decoupled as in the paper
    (multiplied by the learning rate); it skips a non-finite step on the device, as AdamW."""
    return Lion(parameters, lr=cfg.max, weight_decay=cfg.weight_decay)


def build_optimizer(
    parameters: Iterable[nn.Parameter], cfg: OptimizerConfig
) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` over `parameters` (the trainable ones: frozen parameters,
    `finetune.freeze`, are left out)."""
    return lion(parameters, cfg) if cfg.name == "lion" else adamw(parameters, cfg)


class Schedule:
    """The one-cycle learning-rate schedule over `total_steps`, resumable.

    Loading a state saved with another length or other `optimizer` rates (a resumed run that
    was extended, or given a new `optimizer.max`) recomputes the cycle with this one's
    settings and continues it at the saved step, instead of silently keeping the old one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int):
        self.optimizer, self.cfg = optimizer, cfg
        self.total_steps = max(int(total_steps), 2)
        self.scheduler = self._one_cycle()

    def _one_cycle(self) -> torch.optim.lr_scheduler.OneCycleLR:
        cfg = self.cfg
        pct_start = cfg.pct_start
        if pct_start * self.total_steps == 1.0:
            # torch divides by pct_start * total_steps - 1: a warm-up of exactly one step (100
            # steps at the default 0.01) would be a ZeroDivisionError; a hair longer is the same
            pct_start *= 1.0 + 1e-9
        return torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=cfg.max,
            total_steps=self.total_steps,
            div_factor=cfg.max / cfg.initial,
            final_div_factor=cfg.initial / cfg.end,
            pct_start=pct_start,
        )

    def step(self) -> None:
        self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {**self.scheduler.state_dict(), "rates": dataclasses.asdict(self.cfg)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        rates = state.pop("rates", None)  # absent in checkpoints before it was saved
        if state.get("total_steps") == self.total_steps and rates in (None, self._rates()):
            self.scheduler.load_state_dict(state)
            return
        step = int(state["last_epoch"])
        log.warning(
            "salt: the learning-rate schedule changed on resume (%s steps -> %d%s); the "
            "one-cycle is recomputed with the new settings and continues at step %d",
            state.get("total_steps"),
            self.total_steps,
            "" if rates in (None, self._rates()) else f", rates {rates} -> {self._rates()}",
            step,
        )
        self.scheduler = self._one_cycle()
        with warnings.catch_warnings():
            # fast-forwarding a fresh schedule: no optimizer step is meant to come first
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            for _ in range(min(step, self.total_steps - 1)):
                self.scheduler.step()

    def _rates(self) -> dict[str, float]:
        return dataclasses.asdict(self.cfg)
