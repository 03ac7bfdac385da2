"""No training step waits for the device: host syncs per step are counted, so none creeps back.

On a GPU, anything that brings a device value to the host (``.item()``, ``float()``,
``bool()``, ``.tolist()``, ``.cpu()``, a data-dependent shape such as ``nonzero`` or boolean
indexing) makes the host wait for every queued kernel, so the next step cannot be queued
behind the current one. On CPU the same calls are visible as the aten ops (and tensor
methods) below: `HostSyncs` counts them while a real training step runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from salt.errors import TrainingError
from salt.training.loop import confusion_counts, limited, setup, train_step
from salt.training.loss_window import LossWindow, WindowSummary
from tests.test_train import cpu, make_cfg

# aten ops that read a device value on the host or size their output by the data
SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), float(), int(), bool()
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",  # without output_size
}
SYNC_METHODS = ("tolist", "cpu", "numpy")  # bypass the dispatcher (tolist) or copy to host


class HostSyncs(TorchDispatchMode):
    """Count (and name) the host syncs a block of code would cause on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in SYNC_OPS and not (name == "aten.repeat_interleave" and kwargs):
            self.calls.append(name)
        elif name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self.calls.append("boolean indexing")
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting(self) -> Iterator[HostSyncs]:
        originals = {m: getattr(torch.Tensor, m) for m in SYNC_METHODS}

        def counted(method: str):
            def call(tensor, *args, **kwargs):
                self.calls.append(f"Tensor.{method}")
                return originals[method](tensor, *args, **kwargs)

            return call

        try:
            for m in SYNC_METHODS:
                setattr(torch.Tensor, m, counted(m))
            with self:
                yield self
        finally:
            for m, fn in originals.items():
                setattr(torch.Tensor, m, fn)


def count(fn, *args) -> list[str]:
    syncs = HostSyncs()
    with syncs.counting():
        fn(*args)
    return syncs.calls


def test_the_counter_sees_each_kind_of_sync() -> None:
    x = torch.randn(6)
    assert count(lambda: float(x.sum())) == ["aten._local_scalar_dense"]
    assert count(lambda: bool(torch.isfinite(x).all())) == ["aten._local_scalar_dense"]
    assert count(lambda: x[x > 0]) == ["boolean indexing"]
    assert count(lambda: x.tolist()) == ["Tensor.tolist"]
    assert count(lambda: torch.nonzero(x > 0)) == ["aten.nonzero"]
    assert count(lambda: torch.nonzero_static(x > 0, size=2)) == []


@pytest.mark.parametrize(
    ("backend", "precision", "optimizer"),
    [
        ("packed", "32", "adamw"),
        ("varlen", "32", "adamw"),
        ("padded", "32", "adamw"),
        ("packed", "bf16", "adamw"),
        ("padded", "16", "adamw"),
        ("packed", "32", "lion"),
        ("padded", "16", "lion"),
    ],
)
def test_a_training_step_has_no_host_sync(
    tmp_path: Path, sample_cache: Path, backend: str, precision: str, optimizer: str
) -> None:
    cfg = make_cfg(
        tmp_path,
        sample_cache,
        f"model.attention.backend={backend}",
        f"trainer.precision={precision}",
        f"optimizer.name={optimizer}",
        "trainer.fast_dev_run=4",
        "trainer.gradient_clip_val=1.0",  # clipping adds none either
    )
    run = setup(cfg, cpu())
    run.model.train()
    for i, batch in enumerate(limited(run.train_batches, 4)):

        def step(batch=batch, i=i) -> None:
            result = train_step(run, batch)
            run.losses.add(result.losses, i, 0, grad_norm=result.grad_norm)

        assert count(step) == [], f"step {i} syncs"
    # the window comes to the host once for all of its steps (the rest works on that copy)
    calls = count(run.losses.read)
    assert calls[0] == "Tensor.cpu" and calls.count("Tensor.cpu") == 1


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_a_non_finite_loss_skips_the_step_on_the_device_and_is_named_later(
    tmp_path: Path, sample_cache: Path, optimizer: str
) -> None:
    cfg = make_cfg(tmp_path, sample_cache, "trainer.fast_dev_run=3", f"optimizer.name={optimizer}")
    run = setup(cfg, cpu())
    run.model.train()
    batches = list(limited(run.train_batches, 3))
    run.losses.add(train_step(run, batches[0]).losses, 0, 0)
    before = {k: v.clone() for k, v in run.tagger.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in run.optimizer.state.values()]
    adam_steps = [s["step"].clone() for s in run.optimizer.state.values() if "step" in s]
    batches[1].tensors["inputs"]["tracks"][0, 0, 0] = float("nan")
    run.losses.add(train_step(run, batches[1]).losses, 1, 0)
    for key, value in run.tagger.state_dict().items():  # the update was skipped
        assert torch.equal(value, before[key]), key
    for moment, state in zip(moments, run.optimizer.state.values(), strict=True):
        assert torch.equal(state["exp_avg"], moment)  # nor the optimizer's state
    assert [s["step"] for s in run.optimizer.state.values() if "step" in s] == adam_steps
    run.losses.add(train_step(run, batches[2]).losses, 2, 0)  # later steps train again
    weight = "init_nets.tracks.first.linear.weight"
    assert not torch.equal(run.tagger.state_dict()[weight], before[weight])
    with pytest.raises(TrainingError, match=r"non-finite loss at step 1 \(epoch 0\) in task"):
        run.losses.read()


def test_loss_window_means_keep_and_names() -> None:
    window = LossWindow()
    for step, value in enumerate([1.0, 2.0, 3.0]):
        window.add({"jets": torch.tensor(value), "loss": torch.tensor(2 * value)}, step, 0)
    assert window.read(keep=True).means == {"jets": 2.0, "loss": 4.0}  # a check keeps them
    assert len(window) == 3
    summary = window.read()
    assert summary.means == {"jets": 2.0, "loss": 4.0}
    assert len(window) == 0 and window.read().means == {}
    with pytest.raises(ValueError, match="loss names changed"):
        window.add({"jets": torch.tensor(1.0)}, 3, 0)
        window.add({"tracks": torch.tensor(1.0)}, 4, 0)


def test_loss_window_mean_grad_norm_leaves_out_skipped_steps() -> None:
    """An fp16 step whose gradients overflowed has an infinite norm: the scaler skipped it, the
    run goes on, and the window's norm is the mean of the others (NaN if none is finite)."""
    window = LossWindow()
    for step, norm in enumerate([2.0, float("inf"), 4.0]):
        window.add({"loss": torch.tensor(1.0)}, step, 0, grad_norm=torch.tensor(norm))
    calls = count(lambda: window.read(keep=True))
    assert calls.count("Tensor.cpu") == 1  # the norms come with the losses, not on their own
    assert window.read() == WindowSummary({"loss": 1.0}, 3.0)
    window.add({"loss": torch.tensor(1.0)}, 3, 0, grad_norm=torch.tensor(float("nan")))
    assert math.isnan(window.read().grad_norm)
    window.add({"loss": torch.tensor(1.0)}, 4, 0)
    assert window.read().grad_norm is None  # steps without a norm: none to log
    with pytest.raises(ValueError, match="without a gradient norm"):
        window.add({"loss": torch.tensor(1.0)}, 5, 0, grad_norm=torch.tensor(1.0))
        window.add({"loss": torch.tensor(1.0)}, 6, 0)


def test_confusion_counts_need_no_host_sync() -> None:
    """Counted on the device for every validation batch; unlabelled jets (-1) are left out."""
    target = torch.tensor([0, 0, 1, 2, -1, 2, 1])
    predicted = torch.tensor([0, 1, 1, 2, 0, 0, 1])
    counts = []
    assert count(lambda: counts.append(confusion_counts(target, predicted, 3))) == []
    assert counts[0].reshape(3, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
