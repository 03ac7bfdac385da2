"""Every config in conf/ composes, and what it describes can be built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from salt import models
from salt.tracking import build_logger
from tests.test_models_tagger import uniform_class_dict

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


@pytest.mark.parametrize("model", options("model"))
def test_default_config_builds_each_model(model: str) -> None:
    cfg = compose_train(f"model={model}")
    tagger = models.build_tagger(cfg.model, uniform_class_dict(cfg.model))
    assert models.count_parameters(tagger) > 0
    assert models.input_variables(cfg.model)["tracks"]


def test_default_is_gn2_on_the_sample() -> None:
    cfg = compose_train()
    assert cfg.model.name == "GN2" and cfg.data.train_file is None and cfg.data.sample.num_jets > 0
    assert cfg.seed == 42 and cfg.force is False and cfg.tag is False


@pytest.fixture(scope="module")
def real_batch(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A batch of 12 jets from the built-in sample, as the loader yields it."""
    from salt.data.build import make_loader
    from salt.data.ftag import load_yaml_dict
    from salt.data.sample import write_sample

    paths = write_sample(tmp_path_factory.mktemp("sample"), 400, seed=3)
    cfg = compose_train("model=GN2Cat")
    variables = models.input_variables(cfg.model)
    # GN1's track variables include every other model's: each test takes its own columns
    variables["tracks"] = models.input_variables(compose_train("model=GN1").model)["tracks"]
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data["batch_size"] = 12
    labels = {k: dict(v) for k, v in models.label_specs(cfg.model).items()}
    labels["jets"]["HadronConeExclTruthLabelID"] = {5: 0, 4: 1, 0: 2, 15: -1}  # GN1's classes
    loader = make_loader(
        data,
        [paths["train"]],
        paths["norm_dict"],
        variables=variables,
        labels=labels,
        num_jets=-1,
        train=True,
        seed=1,
        num_workers=0,
    )
    return {
        **next(iter(loader)),
        "track_variables": variables["tracks"],
        "class_dict": load_yaml_dict(paths["class_dict"], "class_dict"),
    }


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("attention", options("attention"))
@pytest.mark.parametrize("pooling", options("pooling"))
def test_every_combination_trains_on_a_real_batch(
    model: str, attention: str, pooling: str, real_batch: dict
) -> None:
    cfg = compose_train(f"model={model}", f"attention={attention}", f"pooling={pooling}")
    assert cfg.model.attention.type == attention and cfg.model.pooling.type == pooling
    tagger = models.build_tagger(cfg.model, real_batch["class_dict"])
    variables = models.input_variables(cfg.model)
    inputs = {k: v for k, v in real_batch["inputs"].items() if k in variables}
    columns = [real_batch["track_variables"].index(v) for v in variables["tracks"]]
    inputs["tracks"] = inputs["tracks"][..., columns]
    labels = real_batch["labels"]
    if model == "GN1":  # 3 classes through the label map; taus ignored (-1)
        labels = {
            **labels,
            "jets": {"HadronConeExclTruthLabelID": labels["jets"]["HadronConeExclTruthLabelID"]},
        }
    _, losses = tagger(inputs, real_batch["pad_masks"], labels)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for p in tagger.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
