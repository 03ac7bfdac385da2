"""Every model x attention x pooling choice composes with Hydra and builds a tagger."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from salt.models import build_tagger, count_parameters
from salt.models.tagger import ModelConfig
from tests.test_models_tagger import model_cfg, uniform_class_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = ["GN1", "GN2", "GN2Cat"]
ATTENTIONS = [None, "scaled_dot_product", "gatv2"]
POOLINGS = [None, "global_attention", "cross_attention"]
COMBOS = list(itertools.product(MODELS, ATTENTIONS, POOLINGS))


def combo_id(combo: tuple) -> str:
    return "-".join(str(c) for c in combo)


def overrides(model: str, attention: str | None, pooling: str | None) -> list[str]:
    out = [f"model={model}"]
    if attention:
        out.append(f"attention={attention}")
    if pooling:
        out.append(f"pooling={pooling}")
    return out


def hydra_model(config_dir: Path, combo: tuple):
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="train", overrides=overrides(*combo)).model


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


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_hydra_composition_matches_the_merge_and_builds(minimal_conf: Path, combo) -> None:
    cfg = hydra_model(minimal_conf, combo)
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(
        model_cfg(*combo, class_weights=True)
    )
    model, attention, pooling = combo
    assert cfg.name == model
    if attention:
        assert cfg.attention.type == attention
    if pooling:
        assert cfg.pooling.type == pooling
    tagger = build_tagger(cfg, uniform_class_dict(cfg))
    assert count_parameters(tagger) > 0
    attn = tagger.encoder.layers[0].attn
    assert attn.score_type == cfg.attention.type
    assert attn.num_heads == cfg.attention.num_heads  # the model's heads are kept
    assert type(tagger.pooling).__name__.startswith(
        "Global" if cfg.pooling.type == "global_attention" else "CrossAttention"
    )


@pytest.mark.skipif(not (CONF / "train.yaml").exists(), reason="conf/train.yaml not written yet")
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_project_train_config_composes(combo) -> None:
    cfg = hydra_model(CONF, combo)
    # equal as the schema reads them (the composed node also holds the schema's defaults)
    assert (
        ModelConfig.read(cfg).plain()
        == ModelConfig.read(model_cfg(*combo, class_weights=True)).plain()
    )
    build_tagger(cfg, uniform_class_dict(cfg))


def test_cross_attention_pooling_group_replaces_the_pooling_type(minimal_conf: Path) -> None:
    cfg = hydra_model(minimal_conf, ("GN2", "gatv2", "cross_attention"))
    assert cfg.attention.type == "gatv2" and cfg.attention.num_heads == 8
    assert cfg.pooling.attention.type == "scaled_dot_product"
    tagger = build_tagger(cfg, uniform_class_dict(cfg))
    assert tagger.pooling.blocks[0].attn.score_type == "scaled_dot_product"
    assert len(tagger.pooling.blocks) == cfg.pooling.num_layers
    # back to global attention: the cross-attention keys left in the node are ignored
    cfg.pooling.type = "global_attention"
    assert (
        type(build_tagger(cfg, uniform_class_dict(cfg)).pooling).__name__
        == "GlobalAttentionPooling"
    )
