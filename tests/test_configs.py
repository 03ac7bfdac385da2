"""Every config in conf/ composes, and what it describes can be built (the model, attention and
pooling groups: test_models_configs, over the shared matrix)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from salt.tracking import build_logger

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=list(overrides))


def test_groups_are_not_empty() -> None:
    for group in ("data", "model", "attention", "pooling", "logger"):
        assert options(group), group


@pytest.mark.parametrize("option", options("data"))
def test_data_options_compose(option: str) -> None:
    cfg = compose_train(f"data={option}")
    assert cfg.data.batch_size > 0 and cfg.data.input_map.tracks == "tracks"
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_compose_and_build(option: str, tmp_path: Path) -> None:
    extra = ["logger.offline=true"] if option == "comet" else []
    cfg = compose_train(f"logger={option}", *extra)
    logger = build_logger(cfg.logger, tmp_path, run_name="test")
    logger.finalize()


def test_default_is_gn2_on_the_sample() -> None:
    cfg = compose_train()
    assert cfg.model.name == "GN2" and cfg.data.train_file is None and cfg.data.sample.num_jets > 0
    assert cfg.seed == 42 and cfg.force is False and cfg.tag is False
