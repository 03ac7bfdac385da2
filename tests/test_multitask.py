"""The training loss from the task losses: the weighted sum (default) and GLS, the geometric
mean, against hand computations, in fp16 and bf16, and in a training run's logged loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from salt.models import ModelConfigError, build_tagger
from salt.models.multitask import geometric_mean, total_loss
from salt.models.tagger import ModelConfig
from salt.training.loop import fit
from tests.conftest import TASKS, model_cfg
from tests.test_models_tagger import make_batch, run
from tests.test_train import cpu, make_cfg

UNIT_WEIGHTS = [f"model.tasks.{t}.weight=1" for t in TASKS]


def test_gls_is_the_geometric_mean_with_its_hand_computed_gradient() -> None:
    """(1 * 4 * 16)^(1/3) = 4; dG/dL_i = G / (n L_i) = 4/3, 1/3, 1/12."""
    losses = {
        name: torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for name, v in zip(TASKS, (1.0, 4.0, 16.0), strict=True)
    }
    gls = total_loss(losses, dict.fromkeys(TASKS, 1.0), "GLS")
    assert gls.item() == pytest.approx(4.0, rel=1e-6)
    gls.backward()
    grads = [losses[t].grad.item() for t in TASKS]  # type: ignore[union-attr]
    assert grads == pytest.approx([4 / 3, 1 / 3, 1 / 12], rel=1e-6)
    # the weighted sum, unchanged: 1 * 1 + 0.5 * 4 + 1.5 * 16
    weights = dict(zip(TASKS, (1.0, 0.5, 1.5), strict=True))
    assert total_loss(losses, weights).item() == 27.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gls_neither_under_nor_overflows_in_half_precision(dtype: torch.dtype) -> None:
    small = {f"t{i}": torch.tensor(1e-3, dtype=dtype) for i in range(4)}
    big = {f"t{i}": torch.tensor(300.0, dtype=dtype) for i in range(4)}
    if dtype == torch.float16:  # what the product form (the old tool's) gives there
        assert math.prod(small.values()).item() == 0.0
        assert math.isinf(math.prod(big.values()).item())
    for losses in (small, big):
        expected = next(iter(losses.values())).float().item()
        assert geometric_mean(losses).item() == pytest.approx(expected, rel=1e-5)


def test_a_task_loss_of_zero_leaves_the_gradients_finite() -> None:
    losses = {
        "a": torch.tensor(0.0, requires_grad=True),
        "b": torch.tensor(2.0, requires_grad=True),
    }
    gls = geometric_mean(losses)
    gls.backward()
    assert math.isfinite(gls.item())
    assert all(math.isfinite(v.grad.item()) for v in losses.values())  # type: ignore[union-attr]


def gls_cfg(**weights: float):
    cfg = model_cfg("GN2")
    cfg.loss_mode = "GLS"
    for task in TASKS:
        cfg.tasks[task].weight = weights.get(task, 1.0)
    return cfg


def test_the_taggers_loss_is_the_gls_of_its_task_losses() -> None:
    torch.manual_seed(0)
    tagger = build_tagger(gls_cfg())
    _, losses = run(tagger, make_batch(tagger))
    by_hand = math.prod(losses[t].item() for t in TASKS) ** (1 / 3)
    assert losses["loss"].item() == pytest.approx(by_hand, rel=1e-6)
    losses["loss"].backward()  # a training step's loss
    torch.manual_seed(0)
    default = build_tagger(model_cfg("GN2"))
    assert default.loss_mode == "weighted_sum"
    _, losses = run(default, make_batch(default))
    weighted = sum(default.tasks[t].weight * losses[t] for t in TASKS)
    assert torch.equal(losses["loss"], weighted)  # bit for bit the weighted sum of before


def test_gls_takes_no_task_weights_and_the_old_tools_names() -> None:
    with pytest.raises(ModelConfigError) as err:
        ModelConfig.read(gls_cfg(track_origin=0.5, track_vertexing=1.5))
    message = str(err.value)
    assert message.startswith("model.loss_mode=GLS balances the tasks by their losses")
    assert message.endswith(
        "set model.tasks.track_origin.weight=1 model.tasks.track_vertexing.weight=1"
    )
    cfg = model_cfg("GN2")
    cfg.loss_mode = "wsum"  # the old tool's name for the weighted sum
    assert ModelConfig.read(cfg).loss_mode == "weighted_sum"
    cfg.loss_mode = "gls"
    with pytest.raises(ModelConfigError, match=r"model\.loss_mode=GLS balances"):
        ModelConfig.read(cfg)
    cfg.loss_mode = "product"
    with pytest.raises(ModelConfigError, match=r"model\.loss_mode: expected one of weighted_sum"):
        ModelConfig.read(cfg)


def test_a_gls_run_logs_the_gls_as_its_loss(tmp_path: Path, sample_cache: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        sample_cache,
        "model.loss_mode=GLS",
        *UNIT_WEIGHTS,
        "trainer.max_epochs=1",
        "logger=local",
        "logger.log_every_n_steps=1",
    )
    run_dir = fit(cfg, cpu()).run_dir
    assert run_dir is not None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 12
    for row in steps:  # each step's logged loss is the GLS of its task losses
        by_hand = math.prod(row[f"train/{t}_loss"] for t in TASKS) ** (1 / 3)
        assert row["train/loss"] == pytest.approx(by_hand, rel=1e-5)
