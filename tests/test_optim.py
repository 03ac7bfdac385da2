"""The learning-rate schedule resumes as configured now: same settings continue bit for bit, a
new length or new rates recompute the one-cycle at the saved step."""

from __future__ import annotations

import pytest
import torch

from salt.training.optim import OptimizerConfig, Schedule, adamw


def schedule(cfg: OptimizerConfig, total: int, steps: int = 0) -> Schedule:
    model = torch.nn.Linear(2, 1)
    sched = Schedule(adamw(model.parameters(), cfg), cfg, total)
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()
    return sched


def test_same_settings_continue_exactly() -> None:
    cfg = OptimizerConfig()
    saved = schedule(cfg, 1000, steps=30)
    resumed = schedule(cfg, 1000)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.get_last_lr() == saved.get_last_lr()
    saved.step()
    resumed.step()
    assert resumed.get_last_lr() == saved.get_last_lr()


@pytest.mark.parametrize(
    ("new", "total"),
    [(OptimizerConfig(max=5e-2), 1000), (OptimizerConfig(), 2000)],
    ids=["new max rate", "longer run"],
)
def test_new_rates_or_length_recompute_the_cycle_at_the_saved_step(
    new: OptimizerConfig, total: int
) -> None:
    saved = schedule(OptimizerConfig(), 1000, steps=30)
    resumed = schedule(new, total)
    resumed.load_state_dict(saved.state_dict())
    fresh = schedule(new, total, steps=30)  # what the new settings give at step 30
    assert resumed.get_last_lr() == pytest.approx(fresh.get_last_lr())
    assert resumed.get_last_lr() != pytest.approx(saved.get_last_lr())


@pytest.mark.parametrize("total", [2, 12, 99, 100, 101, 200, 1000])
def test_any_run_length_has_a_schedule(total: int) -> None:
    """A warm-up of exactly one step (100 steps at pct_start 0.01) divided by zero in torch."""
    sched = schedule(OptimizerConfig(), total, steps=total - 1)
    rates = sched.get_last_lr()
    assert rates[0] == pytest.approx(OptimizerConfig().end, rel=1e-3)  # the cycle's end
