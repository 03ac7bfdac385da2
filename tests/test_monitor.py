"""The monitored validation metric (`trainer.monitor`, `trainer.monitor_mode`): the best epoch
in training, the checkpoint names, and the checkpoint salt.evaluate and salt.export take by
default, for a run directory of today and of before."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from salt.errors import ConfigError
from salt.evaluation.run import choose_checkpoint
from salt.models import build_tagger
from salt.training import checkpoint as ckpt
from salt.training.loop import fit
from salt.training.monitor import (
    Monitor,
    best_checkpoint_of,
    continue_best,
    monitored,
    resolve_mode,
)
from salt.training.state import Counters
from tests.conftest import model_cfg
from tests.test_train import cpu, make_cfg


@pytest.fixture(scope="module")
def gn2():
    return build_tagger(model_cfg("GN2"))


def test_auto_monitors_the_jet_classification_loss_lowest_best(gn2) -> None:
    assert monitored("auto", "auto", gn2) == Monitor("val/jet_classification_loss", "min")
    assert monitored("val/loss", "auto", gn2) == Monitor("val/loss", "min")
    assert monitored("val/light_rej_70", "auto", gn2) == Monitor("val/light_rej_70", "max")
    assert monitored("val/jet_accuracy", "min", gn2).mode == "min"  # as asked
    assert resolve_mode("auto", "auto") == "min"
    with pytest.raises(ConfigError, match=r"did you mean val/c_rej_70\?"):
        monitored("val/c_rej70", "auto", gn2)


def test_checkpoint_names_keep_val_loss_for_every_loss() -> None:
    assert Monitor("val/track_origin_loss").checkpoint_name(3, 0.612341) == (
        "epoch=003-val_loss=0.61234.ckpt"
    )
    name = Monitor("val/light_rej_70", "max").checkpoint_name(12, 87.4)
    assert name == "epoch=012-val_light_rej_70=87.40000.ckpt"
    assert ckpt.parse_checkpoint_name(name) == (12, 87.4)
    assert ckpt.parse_checkpoint_name(name, "val_loss") is None


def test_best_is_the_highest_in_max_mode_and_never_non_finite() -> None:
    rej = Monitor("val/light_rej_70", "max")
    assert rej.improves(90.0, rej.worst) and rej.improves(90.0, 90.0)  # a tie: the later epoch
    assert not rej.improves(80.0, 90.0) and not rej.improves(math.inf, 90.0)
    loss = Monitor("val/loss", "min")
    assert loss.improves(0.5, loss.worst) and not loss.improves(math.nan, loss.worst)
    assert math.isnan(rej.value({"val/loss": 1.0}))  # no rejection this epoch: never best


def touch(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(b"x")
    return directory / name


def write_trainer(run_dir: Path, trainer: dict | None) -> None:
    config = {"model": {"name": "GN2"}} | ({"trainer": trainer} if trainer is not None else {})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


def test_a_run_directory_of_before_keeps_its_lowest_val_loss(tmp_path: Path) -> None:
    """No trainer.monitor_mode in its config.yaml (or no config at all): val_loss, lowest."""
    ckpts = tmp_path / "ckpts"
    touch(ckpts, "epoch=000-val_loss=0.70000.ckpt")
    best = touch(ckpts, "epoch=001-val_loss=0.60000.ckpt")
    touch(ckpts, "last.ckpt")
    assert best_checkpoint_of(tmp_path) == best
    write_trainer(tmp_path, {"max_epochs": 2, "monitor": "val/loss"})
    assert best_checkpoint_of(tmp_path) == best == choose_checkpoint(tmp_path, None)


def test_evaluation_takes_the_best_by_the_runs_metric(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    touch(ckpts, "epoch=000-val_light_rej_70=40.00000.ckpt")
    best = touch(ckpts, "epoch=001-val_light_rej_70=90.00000.ckpt")
    touch(ckpts, "epoch=002-val_light_rej_70=inf.ckpt")  # no light jet passed: not the best
    write_trainer(tmp_path, {"monitor": "val/light_rej_70", "monitor_mode": "auto"})
    assert choose_checkpoint(tmp_path, None) == best
    write_trainer(tmp_path, {"monitor": "val/light_rej_70", "monitor_mode": "min"})
    assert choose_checkpoint(tmp_path, None).name.startswith("epoch=000-")
    write_trainer(tmp_path, {"monitor": "val/c_rej_70"})
    with pytest.raises(ckpt.CheckpointError, match=r"no epoch=...-val_c_rej_70=....ckpt"):
        choose_checkpoint(tmp_path, None)


def test_a_resume_that_monitors_another_metric_starts_its_best_anew() -> None:
    loss, rej = Monitor("val/jet_classification_loss", "min"), Monitor("val/c_rej_70", "max")
    old = Counters(best_val_loss=0.6)  # from a checkpoint before the metric was recorded
    continue_best(old, loss)
    assert (old.best_val_loss, old.monitor) == (0.6, loss.name)
    continue_best(old, loss)
    assert old.best_val_loss == 0.6
    continue_best(old, rej)
    assert (old.best_val_loss, old.monitor) == (-math.inf, rej.name)


def test_a_run_monitoring_the_light_rejection_keeps_its_highest(
    tmp_path: Path, sample_cache: Path
) -> None:
    cfg = make_cfg(
        tmp_path,
        sample_cache,
        "trainer.monitor=val/light_rej_70",
        "logger=local",
        "optimizer.max=5e-3",  # a rejection that changes within the two epochs
    )
    run = fit(cfg, cpu())
    assert run.run_dir is not None
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    rejections = [r["val/light_rej_70"] for r in rows if "val/light_rej_70" in r]
    assert len(rejections) == 2 and rejections[0] != rejections[1]
    names = sorted(p.name for p in (run.run_dir / "ckpts").glob("epoch=*"))
    assert [n.split("=")[1] for n in names] == ["000-val_light_rej_70", "001-val_light_rej_70"]
    assert run.counters.best_val_loss == max(rejections)
    best = choose_checkpoint(run.run_dir, None)
    assert best.name.startswith(f"epoch={rejections.index(max(rejections)):03d}-")
