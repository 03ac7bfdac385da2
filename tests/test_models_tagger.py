"""The assembled tagger: padding/permutation symmetry, zero-track jets, sizes, config errors."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from salt.data.ftag import LabelSpec
from salt.models import (
    ModelConfigError,
    Tagger,
    build_tagger,
    count_parameters,
    input_variables,
    label_specs,
)
from tests.conftest import ENCODER_POOLING, combo_id, model_cfg


def make_batch(tagger: Tagger, batch_size: int = 6, num_tracks: int = 9, seed: int = 0) -> dict:
    """A random batch following the loader's contract: scattered padding (zeros, labels -1),
    jet 0 without any real track, jet 1 without padding."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(batch_size, num_tracks, generator=g) < 0.4
    pad[0], pad[1] = True, False
    return batch_with_padding(tagger, pad, g)


def batch_with_padding(tagger: Tagger, pad: torch.Tensor, g: torch.Generator) -> dict:
    """Random inputs and labels for the padding ``pad[B, T]`` (True = padded): padded tracks
    have zero features and label -1, as the loader gives them."""
    batch_size, num_tracks = pad.shape
    inputs = {}
    masks = {}
    for input_type, names in tagger.variables.items():
        if input_type in tagger.object_types:
            # the tracks take `pad`; other object types (GN3's flows, electrons) their own
            mask = pad if input_type == "tracks" else torch.rand(pad.shape, generator=g) < 0.5
            x = torch.randn(batch_size, num_tracks, len(names), generator=g)
            inputs[input_type] = x.masked_fill(mask.unsqueeze(-1), 0.0)
            masks[input_type] = mask
        else:
            inputs[input_type] = torch.randn(batch_size, len(names), generator=g)
    labels: dict[str, dict[str, torch.Tensor]] = {t: {} for t in ("jets", *masks)}
    for task in tagger.tasks.values():
        # regression: every target and denominator (positive, as momenta), then the label
        for name in [*getattr(task, "targets", []), *(getattr(task, "denominators", None) or [])]:
            if task.input_type == "jets":
                labels["jets"][name] = torch.rand(batch_size, generator=g) + 0.5
        if task.input_type == "jets" and task.class_names is not None:
            y = torch.randint(0, len(task.class_names), (batch_size,), generator=g)
        elif task.input_type == "jets":
            y = torch.randn(batch_size, generator=g).abs() + 0.5
        else:
            high = len(task.class_names) if task.class_names is not None else 3
            y = torch.randint(-1, high, (batch_size, num_tracks), generator=g)
            y = y.masked_fill(masks[task.input_type], -1)
        labels[task.input_type][task.label] = y
    return {"inputs": inputs, "pad_masks": masks, "labels": labels}


def run(tagger: Tagger, batch: dict):
    return tagger(batch["inputs"], batch["pad_masks"], batch["labels"])


def permute_tracks(batch: dict, perm: torch.Tensor) -> dict:
    """Reorder the track slots of every jet: new slot i holds old slot perm[b, i]."""

    def take(x: torch.Tensor) -> torch.Tensor:
        index = perm.reshape(*perm.shape, *([1] * (x.dim() - 2))).expand_as(x)
        return torch.gather(x, 1, index)

    out = {
        "inputs": {k: take(v) if k == "tracks" else v for k, v in batch["inputs"].items()},
        "pad_masks": {"tracks": take(batch["pad_masks"]["tracks"])},
        "labels": {
            "jets": batch["labels"]["jets"],
            "tracks": {k: take(v) for k, v in batch["labels"]["tracks"].items()},
        },
    }
    return out


def pad_more(batch: dict, extra: int) -> dict:
    """Append `extra` padded slots (zeros, labels -1) to every jet."""
    pad = batch["pad_masks"]["tracks"]
    b = pad.shape[0]

    def grow(x: torch.Tensor, value) -> torch.Tensor:
        filler = torch.full((b, extra, *x.shape[2:]), value, dtype=x.dtype)
        return torch.cat([x, filler], dim=1)

    return {
        "inputs": {k: grow(v, 0.0) if k == "tracks" else v for k, v in batch["inputs"].items()},
        "pad_masks": {"tracks": grow(pad, True)},
        "labels": {
            "jets": batch["labels"]["jets"],
            "tracks": {k: grow(v, -1) for k, v in batch["labels"]["tracks"].items()},
        },
    }


@pytest.fixture
def tagger(gn2cat_tagger: Tagger) -> Tagger:
    """GN2Cat (also the global concatenation after the encoder) with each attention and
    pooling: the session's, shared with test_models_fast_path (the tests here do not change it)."""
    return gn2cat_tagger


# Padding must not change outputs: 1e-6 absolute in fp32 (with torch's fp32 relative
# tolerance: attention kernels sum over the padded length with vector lanes, which moves
# results by a few ulp); in fp64 the same comparison shows the logic itself is exact.
PRECISIONS = {"fp32": (torch.float32, 1e-6, 1.3e-6), "fp64": (torch.float64, 1e-12, 0.0)}


def in_precision(tagger: Tagger, batch: dict, precision: str) -> tuple[Tagger, dict, float, float]:
    """The tagger and batch in `precision`, with the tolerances that go with it."""
    dtype, atol, rtol = PRECISIONS[precision]
    if dtype != torch.float32:
        tagger = copy.deepcopy(tagger).to(dtype)
        batch = {**batch, "inputs": {k: v.to(dtype) for k, v in batch["inputs"].items()}}
    return tagger, batch, atol, rtol


def assert_close(a: dict, b: dict, atol: float = 1e-6, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            a[key], b[key], atol=atol, rtol=rtol, msg=lambda m, k=key: f"{k}: {m}"
        )


@pytest.mark.parametrize("precision", PRECISIONS)
@torch.no_grad()
def test_appending_padded_slots_changes_nothing(tagger: Tagger, precision: str) -> None:
    tagger, batch, atol, rtol = in_precision(tagger, make_batch(tagger), precision)
    outputs, losses = run(tagger, batch)
    more_outputs, more_losses = run(tagger, pad_more(batch, 5))
    t = batch["pad_masks"]["tracks"].shape[1]
    trimmed = {}
    for name, out in more_outputs.items():
        task = tagger.tasks[name]
        if task.input_type == "tracks":
            extra = out[:, t:]
            assert torch.count_nonzero(extra) == 0  # outputs on padded slots are zero
            out = out[:, :t, :t] if out.dim() == 3 and out.shape[2] == out.shape[1] else out[:, :t]
        trimmed[name] = out
    assert_close(outputs, trimmed, atol, rtol)
    assert_close(losses, more_losses, atol, rtol)


@pytest.mark.parametrize("precision", PRECISIONS)
@torch.no_grad()
def test_moving_padded_slots_changes_nothing(tagger: Tagger, precision: str) -> None:
    """Real tracks compacted to the front (their order kept): same outputs on them."""
    tagger, batch, atol, rtol = in_precision(tagger, make_batch(tagger, seed=1), precision)
    pad = batch["pad_masks"]["tracks"]
    t = pad.shape[1]
    # stable sort: real slots first in their original order, then the padded ones
    key = pad.long() * t + torch.arange(t)
    perm = key.argsort(dim=1)
    moved = permute_tracks(batch, perm)
    assert not torch.equal(moved["pad_masks"]["tracks"], pad)
    outputs, losses = run(tagger, batch)
    moved_outputs, moved_losses = run(tagger, moved)
    assert_close(losses, moved_losses, atol, rtol)
    expected = permuted_outputs(tagger, outputs, perm)
    assert_close(expected, moved_outputs, atol, rtol)


def permuted_outputs(tagger: Tagger, outputs: dict, perm: torch.Tensor) -> dict:
    """What the outputs must become when the tracks are reordered by `perm`."""
    b = torch.arange(perm.shape[0])[:, None, None]
    expected = {}
    for name, out in outputs.items():
        task = tagger.tasks[name]
        if task.input_type == "jets":
            expected[name] = out
        elif task.label == "ftagTruthVertexIndex":
            expected[name] = out[b, perm[:, :, None], perm[:, None, :]]
        else:
            expected[name] = out[b[..., 0], perm]
    return expected


@pytest.mark.parametrize("precision", PRECISIONS)
@torch.no_grad()
def test_track_permutation_permutes_track_outputs_only(tagger: Tagger, precision: str) -> None:
    tagger, batch, atol, rtol = in_precision(tagger, make_batch(tagger, seed=2), precision)
    g = torch.Generator().manual_seed(3)
    perm = torch.rand(batch["pad_masks"]["tracks"].shape, generator=g).argsort(dim=1)
    outputs, losses = run(tagger, batch)
    perm_outputs, perm_losses = run(tagger, permute_tracks(batch, perm))
    # Reordering real tracks reorders floating-point sums (softmax, attention, pooling):
    # exact up to rounding, so fp32 gets 1e-5 here (fp64 stays at 1e-12).
    atol = max(atol, 1e-5) if precision == "fp32" else atol
    assert_close(losses, perm_losses, atol, rtol)
    assert_close(permuted_outputs(tagger, outputs, perm), perm_outputs, atol, rtol)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("combo", ENCODER_POOLING, ids=combo_id)
def test_zero_track_jets_give_finite_outputs_losses_and_gradients(combo) -> None:
    cfg = model_cfg("GN2Cat", *combo)
    cfg.encoder.num_layers = 1  # anomaly mode is slow per operation: keep the graph small
    tagger = build_tagger(cfg).train()
    for all_empty in (False, True):
        batch = make_batch(tagger, seed=4)
        if all_empty:  # a whole batch without a single real track
            batch["pad_masks"]["tracks"][:] = True
            batch["inputs"]["tracks"].zero_()
            for y in batch["labels"]["tracks"].values():
                y.fill_(-1)
        tagger.zero_grad()
        # anomaly mode also fails on NaN produced anywhere inside the backward pass
        with torch.autograd.detect_anomaly(check_nan=True):
            outputs, losses = run(tagger, batch)
            for name, out in outputs.items():
                assert torch.isfinite(out).all(), name
            for name, loss in losses.items():
                assert torch.isfinite(loss), name
            if all_empty:
                assert losses["track_origin"] == 0
                assert losses["track_vertexing"] == 0
            losses["loss"].backward()
        for name, p in tagger.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_predict_gives_probabilities(tagger: Tagger) -> None:
    batch = make_batch(tagger)
    with torch.no_grad():
        probs = tagger.predict(tagger(batch["inputs"], batch["pad_masks"])[0])
    torch.testing.assert_close(probs["jet_classification"].sum(-1), torch.ones(6))
    torch.testing.assert_close(probs["track_origin"].sum(-1), torch.ones(6, 9))
    vertexing = probs["track_vertexing"]
    assert ((vertexing >= 0) & (vertexing <= 1)).all()


def test_derived_sizes_follow_the_variable_lists() -> None:
    cfg = model_cfg("GN2Cat")
    cfg.variables.tracks = ["d0", "z0SinTheta", "dphi"]
    cfg.variables.jets = ["pt_btagJes"]
    cfg.variables["global"] = ["pt_btagJes", "eta_btagJes", "absEta_btagJes"]
    tagger = build_tagger(cfg)
    out_dim, n_global = cfg.encoder.out_dim, 3
    # init net: 3 track variables with 1 jet variable appended to every track
    assert tagger.init_nets["tracks"].first.in_sizes == [3, 1]
    assert tagger.init_nets["tracks"].first.linear.in_features == 4
    # global concatenation after the encoder widens pooling and all task inputs
    assert tagger.pooling.input_size == out_dim + n_global
    tasks = tagger.tasks
    assert tasks["jet_classification"].net.first.linear.in_features == out_dim + n_global
    assert tasks["track_origin"].net.first.in_sizes == [out_dim + n_global, out_dim + n_global]
    assert tasks["track_vertexing"].net.first.in_sizes == [out_dim + n_global] * 3
    outputs, losses = run(tagger, make_batch(tagger))
    assert outputs["track_origin"].shape == (6, 9, 8)
    assert torch.isfinite(losses["loss"])

    # cross-attention pooling: the pooled vector has the pooling out_dim
    cfg = model_cfg("GN2Cat", pooling="cross_attention")
    cfg.pooling.out_dim = 64
    tagger = build_tagger(cfg)
    assert tagger.pooling.input_size == 130 and tagger.pooling.output_size == 64
    assert tagger.tasks["jet_classification"].net.first.in_sizes == [64]
    assert tagger.tasks["track_origin"].net.first.in_sizes == [130, 64]
    assert tagger.tasks["track_vertexing"].net.first.in_sizes == [130, 130, 64]

    # GN2 without global inputs
    tagger = build_tagger(model_cfg("GN2"))
    assert tagger.init_nets["tracks"].first.in_sizes == [19, 2]
    assert tagger.pooling.input_size == 128


def test_gn2_parameter_count_is_about_2_3_million() -> None:
    n = count_parameters(build_tagger(model_cfg("GN2")))
    print(f"GN2 trainable parameters: {n:,}")
    assert abs(n - 2.3e6) / 2.3e6 < 0.05


def test_gn1_uses_three_jet_classes_through_the_label_map() -> None:
    tagger = build_tagger(model_cfg("GN1"))
    jet = tagger.tasks["jet_classification"]
    assert jet.label == "HadronConeExclTruthLabelID"
    assert jet.label_map == {5: 0, 4: 1, 0: 2}
    assert jet.class_names == ["b", "c", "u"]
    assert len(tagger.encoder.layers) == 3
    assert tagger.encoder.layers[0].attn.num_heads == 2
    outputs, _ = run(tagger, make_batch(tagger))
    assert outputs["jet_classification"].shape == (6, 3)


def test_label_specs_and_input_variables() -> None:
    specs = label_specs(model_cfg("GN1"))
    assert specs == {
        "jets": {"HadronConeExclTruthLabelID": LabelSpec({5: 0, 4: 1, 0: 2}, 3)},
        # classification labels know their class count; vertexing labels are read as they are
        "tracks": {"ftagTruthOriginLabel": LabelSpec(None, 8), "ftagTruthVertexIndex": LabelSpec()},
    }
    assert specs["tracks"]["ftagTruthOriginLabel"].task == "track_origin"
    variables = input_variables(model_cfg("GN2Cat"))
    assert variables["global"] == ["pt_btagJes", "eta_btagJes"]
    assert len(variables["tracks"]) == 19 and variables["jets"] == variables["global"]
    # the vertexing task's origin label (pair weights) is read even without an origin task
    cfg = model_cfg("GN2")
    del cfg.tasks.track_origin
    assert label_specs(cfg)["tracks"]["ftagTruthOriginLabel"] == LabelSpec()

    cfg = model_cfg("GN1")
    cfg.tasks.jet_classification.label_map[15] = -1  # taus read but ignored by the loss
    assert label_specs(cfg)["jets"]["HadronConeExclTruthLabelID"].label_map[15] == -1
    cfg.tasks.jet_classification.label_map = {5: 0, 4: 1}
    with pytest.raises(ModelConfigError, match=r"label_map values \[0, 1\] must be exactly"):
        label_specs(cfg)

    cfg = model_cfg("GN1")
    cfg.tasks.second = OmegaConf.to_container(cfg.tasks.jet_classification)
    cfg.tasks.second.label_map = {5: 0, 4: 1, 15: 2}
    with pytest.raises(ModelConfigError, match=r"jet_classification.*second.*label_map"):
        label_specs(cfg)

    # two classification tasks on one unmapped label: the smaller class count is checked
    cfg = model_cfg("GN2")
    cfg.tasks.coarse_origin = OmegaConf.to_container(cfg.tasks.track_origin)
    cfg.tasks.coarse_origin.class_names = ["a", "b", "c"]
    assert label_specs(cfg)["tracks"]["ftagTruthOriginLabel"] == LabelSpec(None, 3)


def test_class_weights_from_the_class_dict() -> None:
    cfg = model_cfg("GN2")
    cfg.tasks.jet_classification.use_class_weights = True
    with pytest.raises(ModelConfigError, match="use_class_weights is true but no class_dict"):
        build_tagger(cfg)
    bad = {"jets": {"flavour_label": [1.0, 2.0, 3.0]}}
    with pytest.raises(ModelConfigError) as err:
        build_tagger(cfg, bad)
    message = str(err.value)
    assert "'jets'" in message and "'flavour_label'" in message
    assert "4 weights" in message and "found 3" in message
    with pytest.raises(ModelConfigError, match="no weights for input 'jets'"):
        build_tagger(cfg, {"tracks": {}})

    weights = [1.0, 2.0, 0.5, 4.0]
    tagger = build_tagger(cfg, {"jets": {"flavour_label": weights}})
    batch = make_batch(tagger)
    outputs, losses = run(tagger, batch)
    expected = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights))(
        outputs["jet_classification"], batch["labels"]["jets"]["flavour_label"]
    )
    torch.testing.assert_close(losses["jet_classification"], expected)
    total = sum(t.weight * losses[n] for n, t in tagger.tasks.items())
    torch.testing.assert_close(losses["loss"], total)


def test_config_errors_name_the_key() -> None:
    cfg = model_cfg("GN2")
    cfg.encoder.num_layer = 3  # typo
    with pytest.raises(
        ModelConfigError, match=r"model\.encoder\.num_layer: unknown key; did you mean num_layers\?"
    ):
        build_tagger(cfg)

    cfg = model_cfg("GN2")
    cfg.tasks.track_vertexing.input = "jets"
    with pytest.raises(ModelConfigError, match=r"model\.tasks\.track_vertexing\.input"):
        build_tagger(cfg)

    cfg = model_cfg("GN2")
    cfg.attention.type = "flash"
    with pytest.raises(ModelConfigError, match=r"model\.attention\.type.*'flash'"):
        build_tagger(cfg)

    cfg = model_cfg("GN2")
    cfg.tasks.jet_classification.activation = "Linear"
    with pytest.raises(ModelConfigError, match="activation 'Linear'"):
        build_tagger(cfg)


def test_wrong_input_width_is_a_clear_error() -> None:
    tagger = build_tagger(model_cfg("GN2"))
    batch = make_batch(tagger)
    tracks = batch["inputs"]["tracks"]
    batch["inputs"]["tracks"] = tracks[..., :18]
    with pytest.raises(ValueError, match=r"'tracks' has 18 features but model\.variables"):
        run(tagger, batch)
    batch["inputs"]["tracks"] = tracks
    del batch["inputs"]["jets"]
    with pytest.raises(KeyError, match="no input 'jets'"):
        run(tagger, batch)


def test_regression_task_builds_and_trains() -> None:
    cfg = model_cfg("GN2")
    cfg.tasks.pt_regression = {
        "type": "regression",
        "input": "jets",
        "label": "pt",
        "loss": "huber",
        "hidden_layers": [32],
    }
    tagger = build_tagger(cfg)
    assert label_specs(cfg)["jets"]["pt"] == LabelSpec(continuous=True)  # float, no classes
    batch = make_batch(tagger)
    outputs, losses = run(tagger, batch)
    assert outputs["pt_regression"].shape == (6, 1)  # [jets, targets]
    assert torch.isfinite(losses["pt_regression"])
    losses["loss"].backward()
