"""Lion: the paper's update on a hand-computed example, the step skipped on the device, the
GradScaler's scale divided out, a resume that continues bit for bit, and a loss that falls."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from salt.errors import ConfigError
from salt.training import checkpoint as ckpt
from salt.training.lion import Lion
from salt.training.loop import fit
from salt.training.optim import OptimizerConfig, Schedule, build_optimizer
from tests.test_train import assert_bitwise_equal, cpu, make_cfg, weights


def lion_step(lion: Lion, params: list[Tensor], grads: list[list[float]]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.tensor(g, dtype=p.dtype)
    lion.step()


def test_update_is_the_papers_formula_on_a_hand_computed_example() -> None:
    """Two steps of c = b1 m + (1 - b1) g; theta -= lr (sign(c) + wd theta);
    m = b2 m + (1 - b2) g, worked out by hand (lr 0.1, wd 0.01, betas 0.9, 0.99)."""
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    lion = Lion([theta], lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    # step 1, m = 0: c = 0.1 g, sign (+, -, 0); theta (1 - 0.001) - 0.1 sign
    lion_step(lion, [theta], [[0.3, -0.2, 0.0]])
    assert theta.tolist() == pytest.approx([0.899, -1.898, 0.4995], rel=1e-12)
    assert lion.state[theta]["exp_avg"].tolist() == pytest.approx([0.003, -0.002, 0.0])
    # step 2: c = 0.9 m + 0.1 g = (0.0017, -0.0518, 0.02): the first follows the momentum
    # against its gradient
    lion_step(lion, [theta], [[-0.01, -0.5, 0.2]])
    assert theta.tolist() == pytest.approx([0.798101, -1.796102, 0.3990005], rel=1e-12)
    assert lion.state[theta]["exp_avg"].tolist() == pytest.approx(
        [0.00287, -0.00698, 0.002], rel=1e-12
    )


def reference_step(p: Tensor, g: Tensor, m: Tensor, lr: float, wd: float, b1: float, b2: float):
    """lion-pytorch's update_fn, one parameter at a time."""
    p.mul_(1.0 - lr * wd)
    p.add_(m.clone().mul_(b1).add(g, alpha=1.0 - b1).sign_(), alpha=-lr)
    m.mul_(b2).add_(g, alpha=1.0 - b2)


def test_foreach_update_equals_the_per_parameter_one_bitwise() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    ours = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone() for p in ours]
    moments = [torch.zeros_like(p) for p in theirs]
    lion = Lion(ours, lr=3e-3, weight_decay=0.1)
    for _ in range(5):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.clone()
        lion.step()
        for p, g, m in zip(theirs, grads, moments, strict=True):
            reference_step(p, g, m, 3e-3, 0.1, 0.9, 0.99)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.detach(), b)


def test_found_inf_skips_the_step_on_the_device() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    lion = Lion([p], lr=0.1, weight_decay=0.1)
    lion_step(lion, [p], [[1.0, -1.0]])
    before, moment = p.detach().clone(), lion.state[p]["exp_avg"].clone()
    lion.found_inf = torch.tensor(1.0)  # type: ignore[attr-defined]
    lion_step(lion, [p], [[float("nan"), float("inf")]])
    assert torch.equal(p.detach(), before) and torch.equal(lion.state[p]["exp_avg"], moment)
    # found_inf = 0: the same values as a step without it
    twin = torch.tensor(before.tolist(), requires_grad=True)
    plain = Lion([twin], lr=0.1, weight_decay=0.1)
    plain.load_state_dict(lion.state_dict())
    lion.found_inf = torch.tensor(0.0)  # type: ignore[attr-defined]
    lion_step(lion, [p], [[0.5, 0.25]])
    lion_step(plain, [twin], [[0.5, 0.25]])
    assert torch.equal(p.detach(), twin.detach())
    assert torch.equal(lion.state[p]["exp_avg"], plain.state[twin]["exp_avg"])


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))


def test_grad_scaler_hands_its_scale_to_the_step() -> None:
    """With a GradScaler the gradients reach the step still scaled: Lion divides the scale out
    (a power of two: the same bits as unscaled gradients) and skips a step with an inf."""
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    scaled, plain = tiny_model(), tiny_model()
    opt_s = Lion(scaled.parameters(), lr=1e-2, weight_decay=0.1)
    opt_p = Lion(plain.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        for model, opt in ((scaled, opt_s), (plain, opt_p)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if model is scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    for a, b in zip(scaled.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    # an overflowing gradient: the step is skipped, the scale halves
    before = [p.detach().clone() for p in scaled.parameters()]
    opt_s.zero_grad()
    scaler.scale(nn.functional.mse_loss(scaled(x), y) * float("inf")).backward()
    scaler.step(opt_s)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(scaled.parameters(), before, strict=True))
    assert scaler.get_scale() == 512.0


def train_steps(model: nn.Module, sched: Schedule, batches: list[tuple[Tensor, Tensor]]) -> None:
    for x, y in batches:
        sched.optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        sched.optimizer.step()
        sched.step()


def test_state_dict_resumes_bit_for_bit_with_the_one_cycle_schedule() -> None:
    """Stopped after 7 of 20 steps, saved as a checkpoint is (weights_only), loaded into a new
    model, optimizer and schedule: the weights of the uninterrupted run."""
    cfg = OptimizerConfig(name="lion")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen))] * 20
    straight = tiny_model()
    sched = Schedule(build_optimizer(straight.parameters(), cfg), cfg, 20)
    train_steps(straight, sched, batches)

    first = tiny_model()
    sched = Schedule(build_optimizer(first.parameters(), cfg), cfg, 20)
    train_steps(first, sched, batches[:7])
    buffer = io.BytesIO()
    state = {"model": first.state_dict(), "optimizer": sched.optimizer.state_dict()}
    state["scheduler"] = sched.state_dict()
    ckpt._check_loadable(state, "")  # what save_checkpoint requires
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_model(seed=5)  # other initial weights: all of it comes from the state
    opt = build_optimizer(resumed.parameters(), cfg)
    sched = Schedule(opt, cfg, 20)
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    assert isinstance(opt, Lion) and opt.param_groups[0]["betas"][1] == 0.99
    train_steps(resumed, sched, batches[7:])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lion_reduces_the_loss_of_a_small_regression() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(256, 3, generator=gen)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5]])).tanh()
    model = tiny_model()
    cfg = OptimizerConfig(name="lion", initial=1e-4, max=1e-2, end=1e-4)
    sched = Schedule(build_optimizer(model.parameters(), cfg), cfg, 200)
    start = nn.functional.mse_loss(model(x), y).item()
    train_steps(model, sched, [(x, y)] * 200)
    assert nn.functional.mse_loss(model(x), y).item() < 0.2 * start


def test_bad_settings_are_refused() -> None:
    p = [torch.zeros(1, requires_grad=True)]
    for kwargs in ({"lr": 0.0}, {"betas": (0.9, 1.5)}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError, match="Lion"):
            Lion(p, **kwargs)  # type: ignore[arg-type]
    cfg = OptimizerConfig(name="AdamW")
    cfg.check("optimizer")  # the old tool's spelling
    assert cfg.name == "adamw"
    with pytest.raises(ConfigError, match=r"optimizer\.name: expected one of"):
        OptimizerConfig(name="sgd").check("optimizer")


# ---- in a training run -------------------------------------------------------------------------
def test_a_resumed_lion_run_ends_with_the_weights_of_an_uninterrupted_one(
    tmp_path: Path, sample_cache: Path
) -> None:
    # Lion's steps are signs: a rate 10x AdamW's makes the 24 steps of this run visible
    lion = [
        "optimizer.name=lion",
        "optimizer.max=5e-3",
        "logger=local",
        "logger.log_every_n_steps=1",
    ]
    straight = fit(make_cfg(tmp_path, sample_cache, *lion), cpu()).run_dir
    assert straight is not None
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert sum(train[-6:]) < sum(train[:6]) and val[1] < val[0]  # it learns
    (epoch0,) = (straight / "ckpts").glob("epoch=000-*.ckpt")
    assert ckpt.load_checkpoint(epoch0)["optimizer_name"] == "lion"
    resumed = fit(make_cfg(tmp_path, sample_cache, *lion, f"ckpt_path='{epoch0}'"), cpu()).run_dir
    assert resumed is not None and resumed != straight
    assert_bitwise_equal(
        weights(straight / "ckpts/last.ckpt"), weights(resumed / "ckpts/last.ckpt")
    )
    # its moments continue no other optimizer
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer.name=lion, the config has adamw"):
        fit(make_cfg(tmp_path, sample_cache, f"ckpt_path='{epoch0}'"), cpu())
