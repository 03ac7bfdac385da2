"""The model x attention x pooling matrix (tests/conftest.py): every choice composes with Hydra as
`model_cfg` merges it, and every distinct model it gives builds and trains, once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from salt import models
from salt.models.tagger import ModelConfig
from tests.conftest import (
    CHOICES,
    CONF,
    MATRIX,
    combo_id,
    group_overrides,
    model_cfg,
    uniform_class_dict,
)
from tests.test_models_tagger import make_batch


def hydra_model(config_dir: Path, combo: tuple):
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="train", overrides=group_overrides(*combo)).model


@pytest.fixture(scope="module")
def minimal_conf(tmp_path_factory) -> Path:
    """This project's model/attention/pooling groups under a minimal train.yaml with the
    same defaults list shape as conf/train.yaml (without the data/logger/launcher groups)."""
    root = tmp_path_factory.mktemp("conf")
    for group in ("model", "attention", "pooling"):
        shutil.copytree(CONF / group, root / group)
    (root / "train.yaml").write_text(
        "defaults:\n  - model: GN2\n  - attention: null\n  - pooling: null\n  - _self_\n"
    )
    return root


@pytest.mark.parametrize("choice", CHOICES, ids=combo_id)
def test_every_choice_composes_as_the_merge(minimal_conf: Path, choice: tuple) -> None:
    """In a minimal config and in the project's conf/train.yaml; a group left out (None) is the
    model's own choice, so the choices build exactly the models of MATRIX."""
    expected = OmegaConf.to_container(model_cfg(*choice, class_weights=True))
    for config_dir in (minimal_conf, CONF):
        cfg = hydra_model(config_dir, choice)
        # equal as the schema reads them (conf/train.yaml's node also holds its defaults)
        assert ModelConfig.read(cfg).plain() == ModelConfig.read(expected).plain(), config_dir
    model, attention, pooling = choice
    assert cfg.name == model
    if attention:
        assert cfg.attention.type == attention
    if pooling:
        assert cfg.pooling.type == pooling
    built = (model, cfg.attention.type, cfg.pooling.type)
    assert built in MATRIX
    assert OmegaConf.to_container(model_cfg(*built, class_weights=True)) == expected


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def real_batch(sample: Path) -> dict:
    """A batch of 12 jets from the built-in sample, as the loader yields it."""
    from salt.data.build import make_loader
    from salt.data.ftag import load_yaml_dict

    cfg = compose_train("model=GN2Cat")
    gn3 = compose_train("model=GN3").model
    variables = models.input_variables(gn3)  # GN3's: jets, global, flows, electrons
    # GN1's track variables include every other model's: each test takes its own columns
    variables["tracks"] = models.input_variables(compose_train("model=GN1").model)["tracks"]
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data["batch_size"] = 12
    labels = {k: dict(v) for k, v in models.label_specs(gn3).items()}  # GN2's and GN3's
    labels["jets"]["HadronConeExclTruthLabelID"] = {5: 0, 4: 1, 0: 2, 15: -1}  # GN1's classes
    loader = make_loader(
        data,
        [sample / "train.h5"],
        sample / "norm_dict.yaml",
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
        "class_dict": load_yaml_dict(sample / "class_dict.yaml", "class_dict"),
    }


def real_inputs(real_batch: dict, model: str, variables: dict) -> dict:
    """The real batch with the model's own input columns and labels."""
    inputs = {k: v for k, v in real_batch["inputs"].items() if k in variables}
    masks = {k: v for k, v in real_batch["pad_masks"].items() if k in variables}
    columns = [real_batch["track_variables"].index(v) for v in variables["tracks"]]
    inputs["tracks"] = inputs["tracks"][..., columns]
    labels = real_batch["labels"]
    if model == "GN1":  # 3 classes through the label map; taus ignored (-1)
        labels = {
            **labels,
            "jets": {"HadronConeExclTruthLabelID": labels["jets"]["HadronConeExclTruthLabelID"]},
        }
    return {"inputs": inputs, "pad_masks": masks, "labels": labels}


@pytest.mark.parametrize("combo", MATRIX, ids=combo_id)
def test_every_combination_builds_and_trains(combo: tuple, real_batch: dict) -> None:
    """Built from the project's config with the sample's class weights: forward and backward
    on a real batch and on a random one (a jet without tracks, a jet without padding) give a
    finite loss and a finite gradient for every parameter."""
    model, attention, pooling = combo
    cfg = compose_train(*group_overrides(*combo))
    assert cfg.model.attention.type == attention and cfg.model.pooling.type == pooling
    variables = models.input_variables(cfg.model)
    assert variables["tracks"]
    tagger = models.build_tagger(cfg.model, real_batch["class_dict"])
    assert models.count_parameters(tagger) > 0
    attn = tagger.encoder.layers[0].attn
    assert attn.score_type == attention
    assert attn.num_heads == cfg.model.attention.num_heads  # the model's heads are kept
    assert type(tagger.pooling).__name__.startswith(
        "Global" if pooling == "global_attention" else "CrossAttention"
    )
    batches = {
        "real": real_inputs(real_batch, model, variables),
        "random": make_batch(tagger, batch_size=3, num_tracks=4),
    }
    for kind, batch in batches.items():
        tagger.zero_grad(set_to_none=True)
        _, losses = tagger(batch["inputs"], batch["pad_masks"], batch["labels"])
        assert torch.isfinite(losses["loss"]), kind
        losses["loss"].backward()
        for name, p in tagger.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (kind, name)


def test_cross_attention_pooling_group_replaces_the_pooling_type(minimal_conf: Path) -> None:
    cfg = hydra_model(minimal_conf, ("GN2", "gatv2", "cross_attention"))
    assert cfg.attention.type == "gatv2" and cfg.attention.num_heads == 8
    assert cfg.pooling.attention.type == "scaled_dot_product"
    tagger = models.build_tagger(cfg, uniform_class_dict(cfg))
    assert tagger.pooling.blocks[0].attn.score_type == "scaled_dot_product"
    assert len(tagger.pooling.blocks) == cfg.pooling.num_layers
    # back to global attention: the cross-attention keys left in the node are ignored
    cfg.pooling.type = "global_attention"
    assert (
        type(models.build_tagger(cfg, uniform_class_dict(cfg)).pooling).__name__
        == "GlobalAttentionPooling"
    )
