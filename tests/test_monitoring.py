"""Monitoring in real (tiny) trainings: the learning rate and gradient norm of every logging
step, the jet confusion matrix of each validation, and TensorBoard event files that a resumed
run continues without repeating or losing a step."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from salt.tracking.metrics import CONFUSION_FILE, METRICS_FILE, read_rows
from salt.training import checkpoint as ckpt
from salt.training.loop import fit, grad_norm
from salt.training.optim import OptimizerConfig, Schedule
from tests.test_tracking import PNG_MAGIC, tb_events, tb_points, tb_scalars
from tests.test_train import cpu, make_cfg

# a metrics row and TensorBoard point every step; the tiny run has 12 steps per epoch
TENSORBOARD = ["logger=tensorboard", "logger.log_every_n_steps=1"]
STEPS_PER_EPOCH = 12
CLIP = 1e-3  # far below the tiny model's gradient norms (about 0.5): the norm logged is before


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory, sample_cache: Path) -> Path:
    """One epoch with logger=tensorboard and gradient clipping; read only."""
    tmp = tmp_path_factory.mktemp("tensorboard_run")
    cfg = make_cfg(
        tmp, sample_cache, *TENSORBOARD, "trainer.max_epochs=1", f"trainer.gradient_clip_val={CLIP}"
    )
    run_dir = fit(cfg, cpu()).run_dir
    assert run_dir is not None
    return run_dir


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_rows(run_dir / METRICS_FILE) if "train/loss" in r]


def test_every_logging_step_has_the_lr_and_the_grad_norm_before_clipping(
    tensorboard_run: Path,
) -> None:
    rows = train_rows(tensorboard_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS_PER_EPOCH + 1))
    # each step's row has the rate that step applied (the schedule moves after the step)
    saved = OmegaConf.load(tensorboard_run / "config.yaml").optimizer
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))])
    schedule = Schedule(optimizer, OptimizerConfig(**OmegaConf.to_container(saved)), len(rows))
    applied = []
    for _ in rows:
        applied.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert [r["train/lr"] for r in rows] == pytest.approx(applied, rel=1e-12)
    norms = [r["train/grad_norm"] for r in rows]
    assert all(isinstance(n, float) and math.isfinite(n) and n > 10 * CLIP for n in norms), norms
    # TensorBoard has the same points as the metrics file, at the same steps
    scalars = tb_scalars(tensorboard_run / "tensorboard")
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    assert [s for s, _ in scalars["val/jet_accuracy"]] == [STEPS_PER_EPOCH]
    assert (tensorboard_run / "plots" / "grad_norm.png").read_bytes().startswith(PNG_MAGIC)


def test_grad_norm_is_the_norm_clip_grad_norm_computes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3))
    model[3].requires_grad_(False)  # parameters without a gradient are left out
    model(torch.randn(5, 4)).pow(2).sum().backward()
    expected = nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    assert grad_norm(model.parameters()) == pytest.approx(float(expected), rel=1e-6)
    assert float(grad_norm([])) == 0.0


def test_fp16_logs_the_unscaled_grad_norm(
    tmp_path: Path, sample_cache: Path, tensorboard_run: Path
) -> None:
    """The GradScaler multiplies the loss by 2**16 and halves that while gradients overflow
    (the step is skipped): such steps log no norm (null), and the first finite one is the norm
    of the gradients the optimizer applies, as in full precision at the same step."""
    cfg = make_cfg(
        tmp_path, sample_cache, *TENSORBOARD, "trainer.precision=16", "trainer.max_steps=6"
    )
    run_dir = fit(cfg, cpu()).run_dir
    assert run_dir is not None
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    finite = [r for r in rows if r["train/grad_norm"] is not None]
    assert finite, rows
    # the same batches; the full-precision weights have barely moved in the first steps
    full = {r["step"]: r["train/grad_norm"] for r in train_rows(tensorboard_run)}
    first = finite[0]
    assert first["train/grad_norm"] == pytest.approx(full[first["step"]], rel=0.05)
    assert (run_dir / "plots" / "grad_norm.png").read_bytes().startswith(PNG_MAGIC)


def validation_labels(run_dir: Path) -> np.ndarray:
    """The flavour labels of the validation jets the run used (metadata.yaml names them)."""
    val = yaml.safe_load((run_dir / "metadata.yaml").read_text())["data"]["val"]
    with h5py.File(val["path"][0]) as f:
        return f["jets"]["flavour_label"][: val["num_jets"]]


def test_confusion_matrix_counts_each_class_of_validation_jets(tensorboard_run: Path) -> None:
    record = json.loads((tensorboard_run / CONFUSION_FILE).read_text())
    assert record["class_names"] == ["b", "c", "u", "tau"]
    assert (record["step"], record["epoch"]) == (STEPS_PER_EPOCH, 0)
    counts = np.array(record["counts"])
    expected = np.bincount(validation_labels(tensorboard_run), minlength=4)
    assert counts.sum(axis=1).tolist() == expected.tolist()
    for row in record["fractions"]:
        assert sum(row) == pytest.approx(1.0)
    (val,) = [r for r in read_rows(tensorboard_run / METRICS_FILE) if "val/loss" in r]
    assert val["val/jet_accuracy"] == pytest.approx(np.trace(counts) / counts.sum())
    png = tensorboard_run / "plots" / "confusion_matrix.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert ("val/confusion_matrix", STEPS_PER_EPOCH) in tb_points(tensorboard_run / "tensorboard")


def assert_each_step_once(run_dir: Path) -> None:
    """Two epochs of logging, every point once, in the event files and the metrics file."""
    points = Counter(tb_points(run_dir / "tensorboard"))
    assert [p for p, n in points.items() if n > 1] == []
    steps = range(1, 2 * STEPS_PER_EPOCH + 1)
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert sorted(s for t, s in points if t == tag) == list(steps), tag
    for tag in ("val/loss", "val/confusion_matrix"):
        assert sorted(s for t, s in points if t == tag) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert [r["step"] for r in train_rows(run_dir)] == list(steps)


def wall_times(run_dir: Path, tag: str) -> dict[int, float]:
    return {
        e.step: e.wall_time
        for e in tb_events(run_dir / "tensorboard")
        for v in e.summary.value
        if v.tag == tag
    }


def test_resumed_tensorboard_runs_log_each_step_once(
    tmp_path: Path, sample_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Slurm job logged two epochs but was killed before saving the second: its last
    complete checkpoint is epoch 0's. The requeued job continues the same run directory from
    there; a `ckpt_path=` run continues from it in a new directory. Both have each step once,
    and the steps after the checkpoint are the continuing run's."""
    cfg = make_cfg(tmp_path, sample_cache, *TENSORBOARD, "logger.plots=false")
    monkeypatch.setenv("SLURM_JOB_ID", "4244")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    first = fit(cfg, cpu()).run_dir
    assert first is not None
    ckpts = first / "ckpts"
    (epoch0,) = ckpts.glob("epoch=000-*.ckpt")
    for path in ckpts.glob("epoch=001-*.ckpt"):
        path.unlink()
    shutil.copyfile(epoch0, ckpts / ckpt.LAST)
    assert ckpt.load_checkpoint(epoch0)["logger"]["tensorboard_step"] == STEPS_PER_EPOCH

    requeued_at = time.time()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert fit(cfg, cpu()).run_dir == first
    assert_each_step_once(first)
    times = wall_times(first, "train/loss")
    assert all(t < requeued_at for s, t in times.items() if s <= STEPS_PER_EPOCH)
    assert all(t >= requeued_at for s, t in times.items() if s > STEPS_PER_EPOCH)

    monkeypatch.delenv("SLURM_JOB_ID")
    resumed_at = time.time()
    resume = make_cfg(tmp_path, sample_cache, *TENSORBOARD, f"ckpt_path='{epoch0}'")
    third = fit(resume, cpu())
    assert third.run_dir is not None and third.run_dir != first
    assert_each_step_once(third.run_dir)
    times = wall_times(third.run_dir, "train/loss")
    assert all(t < resumed_at for s, t in times.items() if s <= STEPS_PER_EPOCH)
    assert all(t >= resumed_at for s, t in times.items() if s > STEPS_PER_EPOCH)
