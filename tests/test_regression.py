"""Regression tasks (several targets, denominators, scaling, L1/Huber/MSE/Gaussian losses, on
jets and on tracks), per-jet sample weights, and the label maps of track-type and jet-charge
classification: losses against hand computations, the config errors, the loader on real HDF5
files, a tiny training run, the predictions file in physical units and the ONNX export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf, open_dict

from salt.data.build import check_no_truth_inputs
from salt.data.ftag import DataError, FTAGReader
from salt.data.labels import LabelSpec
from salt.data.sample import write_sample
from salt.errors import ConfigError, ExportError
from salt.evaluate import evaluate
from salt.models import ClassificationTask, RegressionTask, build_tagger, label_specs
from salt.models.scaling import ScalingConfig, TargetScaler
from salt.models.tagger import ModelConfig
from salt.models.tasks import TaskConfig, regression_output_names
from salt.training import checkpoint as ckpt
from tests.conftest import JET_VARS, TRACK_VARS, model_cfg, norm_dict_for, write_ftag_file
from tests.test_evaluate import compose_evaluate, compose_train, make_run_dir

# the old tool's GN3V01 track-type map, and the same map completed with the values it leaves
# as they are (NoTruth 0, Other 1, Pion 2, Kaon 3): here a label_map lists every value
OLD_TRACK_TYPE_MAP = {-2: 2, -3: 3, 5: 4, -5: 4, 6: 5, -6: 5}
TRACK_TYPE_MAP = {0: 0, 1: 1, 2: 2, 3: 3, **OLD_TRACK_TYPE_MAP}
TRACK_TYPES = ["NoTruth", "Other", "Pion", "Kaon", "Electron", "Muon"]
# part of GN3V01's jets_charge map (signed PDG IDs -> b, anti-b, other), with a nucleus' ID
# beyond float32's exact integers
CHARGE_MAP = {
    0: 2,
    15: 2,
    -15: 2,
    511: 1,
    -511: 0,
    521: 1,
    -521: 0,
    5122: 0,
    -5122: 1,
    421: 2,
    -421: 2,
    411: 2,
    -411: 2,
    1000010020: 2,
}
CHARGE_CLASSES = ["bquark", "antibquark", "other"]
NAN = float("nan")


# ---- losses against hand computations -------------------------------------------------------
def hand_loss(
    kind: str, pred: list, target: list, weights: list | None = None, delta: float = 1.0
) -> float:
    """sum(w * l) / sum(w) over the finite targets, one value at a time (Gaussian: ``pred``
    holds the means, then the log-variances, per row)."""
    total = norm = 0.0
    for j, row in enumerate(target):
        k_targets = len(row)
        for k, y in enumerate(row):
            if not math.isfinite(y):
                continue
            mu = pred[j][k]
            r = mu - y
            if kind == "mse":
                loss = r * r
            elif kind == "l1":
                loss = abs(r)
            elif kind == "huber":
                loss = 0.5 * r * r if abs(r) < delta else delta * (abs(r) - 0.5 * delta)
            else:  # gaussian_nll: 0.5 * (log var + r^2 / var)
                log_var = pred[j][k_targets + k]
                loss = 0.5 * (log_var + r * r / math.exp(log_var))
            w = 1.0 if weights is None else weights[j]
            total, norm = total + w * loss, norm + w
    return total / norm


@pytest.mark.parametrize("kind", ["mse", "l1", "huber", "gaussian_nll"])
@pytest.mark.parametrize("weighted", [False, True])
def test_regression_losses_equal_the_hand_computation(kind: str, weighted: bool) -> None:
    """Two targets, a missing one (NaN) ignored; with sample weights a weighted mean."""
    target = [[1.5, -2.0], [NAN, 0.25], [0.0, 4.0]]
    means = [[1.0, -1.0], [2.0, 0.5], [3.0, 4.5]]
    pred = [[*m, 0.3, -0.7] for m in means] if kind == "gaussian_nll" else means
    weights = [0.5, 2.0, 1.5]
    task = RegressionTask(
        "r",
        ["a", "b"],
        input_size=4,
        loss=kind,
        huber_delta=0.8,
        sample_weight="w" if weighted else None,
    )
    labels = {
        "jets": {
            "a": torch.tensor([r[0] for r in target]),
            "b": torch.tensor([r[1] for r in target]),
        }
    }
    if weighted:
        labels["jets"]["w"] = torch.tensor(weights)
    output = torch.tensor(pred, requires_grad=True)
    loss = task.loss(output, task.target(labels), torch.zeros(3, 0, dtype=torch.bool))
    expected = hand_loss(kind, pred, target, weights if weighted else None, delta=0.8)
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(output.grad).all() and output.grad[1, 0] == 0  # the missing target


def test_classification_sample_weights_are_a_weighted_mean() -> None:
    """sum(w_jet * w_class * l) / sum(w_jet * w_class), unknown labels (-1) left out."""
    torch.manual_seed(3)
    class_weights = [1.0, 2.0, 0.5]
    task = ClassificationTask(
        "c", "jets", "flavour", ["b", "c", "u"], 4, class_weights=class_weights, sample_weight="w"
    )
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, -1, 1])
    w = torch.tensor([0.5, 3.0, 7.0, 1.0])
    target = task.target({"jets": {"flavour": labels, "w": w}})
    loss = task.loss(logits, target, torch.zeros(4, 0, dtype=torch.bool))
    total = norm = 0.0
    for j in range(4):
        if labels[j] < 0:
            continue
        nll = -torch.log_softmax(logits[j], -1)[labels[j]]
        weight = float(w[j]) * class_weights[labels[j]]
        total, norm = total + weight * float(nll), norm + weight
    assert float(loss) == pytest.approx(total / norm, rel=1e-6)


def test_object_regression_ignores_padded_slots() -> None:
    task = RegressionTask("d0", ["a"], input_size=4, loss="mse", input_type="tracks")
    pad = torch.tensor([[False, True], [False, False]])
    output = torch.tensor([[[1.0], [5.0]], [[2.0], [0.0]]])
    target = task.target({"tracks": {"a": torch.tensor([[2.0, 100.0], [2.0, NAN]])}})
    # slot (0, 1) is padded (a finite value there counts for nothing), (1, 1) has no target
    assert float(task.loss(output, target, pad)) == pytest.approx((1.0 + 0.0) / 2)
    empty = task.loss(output, target, torch.ones(2, 2, dtype=torch.bool))
    assert float(empty) == 0.0  # no real object in the batch: 0, not NaN


def test_losses_stay_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    task = RegressionTask("g", ["a", "b"], input_size=8, loss="gaussian_nll", hidden_layers=[8])
    x = torch.randn(5, 8)
    labels = {"jets": {"a": torch.randn(5), "b": torch.randn(5)}}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = task(x, torch.zeros(5, 0, 8), torch.zeros(5, 0, dtype=torch.bool))
        loss = task.loss(output, task.target(labels), torch.zeros(5, 0, dtype=torch.bool))
        values = task.predict(output)
    assert output.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and values.dtype == torch.float32


# ---- scaling and denominators ---------------------------------------------------------------
SCALINGS = [
    ScalingConfig(op="log", x_scale=1e-3),
    ScalingConfig(op="log", x_scale=2.0, x_off=1.0, op_scale=0.5, op_off=-3.0),
    ScalingConfig(op="linear", x_off=-1.1, op_scale=20.0),  # (r - mean) / std
    ScalingConfig(op="linear", x_scale=-2.0, x_off=0.5, op_scale=3.0, op_off=7.0),
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: f"{s.op}-{s.x_scale}")
def test_scaling_then_its_inverse_is_the_identity(scaling: ScalingConfig) -> None:
    scaler = TargetScaler(["x", "y"], {"x": scaling})  # y: not scaled
    values = torch.tensor([[1.5e4, -3.0], [2.0e5, 0.5], [0.7, 12.0]], dtype=torch.float64)
    torch.testing.assert_close(scaler.inverse(scaler.scale(values)), values)
    # the slope of the inverse, for the widths: autograd's
    u = scaler.scale(values).requires_grad_()
    scaler.inverse(u)[:, 0].sum().backward()
    torch.testing.assert_close(scaler.inverse_slope(u.detach())[:, 0], u.grad[:, 0].abs())
    assert (scaler.inverse_slope(u.detach())[:, 1] == 1).all()


def test_a_task_predicts_its_target_back_in_physical_units() -> None:
    """target(): divided by the denominator, then scaled; predict() of that exact value with
    the same denominator gives the target back."""
    scaling = {"pt": SCALINGS[1], "m": SCALINGS[3]}
    task = RegressionTask(
        "j", ["pt", "m"], input_size=4, denominators=["pt_reco", "m_reco"], scaling=scaling
    )
    pt, m = torch.tensor([5.0e4, 2.2e5, 3.0e4]), torch.tensor([12.0, 30.0, -4.0])
    den = torch.tensor([[4.0e4, 10.0], [2.0e5, 25.0], [3.5e4, 8.0]])
    labels = {"jets": {"pt": pt, "m": m, "pt_reco": den[:, 0], "m_reco": den[:, 1]}}
    u = task.target(labels)
    torch.testing.assert_close(u[:, 0], torch.log(pt / den[:, 0] * 2.0 + 1.0) * 0.5 - 3.0)
    torch.testing.assert_close(task.predict(u, den), torch.stack([pt, m], -1))


def test_gaussian_width_goes_through_the_scaling_by_the_delta_method() -> None:
    """σ = |denominator| * |d inverse / du| * exp(log var / 2), at the predicted mean."""
    scaling = {"pt": ScalingConfig(op="log", x_scale=3.0, op_scale=2.0)}
    task = RegressionTask(
        "g", "pt", input_size=4, loss="gaussian_nll", denominators=["d"], scaling=scaling
    )
    output = torch.tensor([[0.4, -1.0], [1.3, 0.6]])
    den = torch.tensor([[5.0e4], [-2.0e4]])
    values = task.predict(output, den)
    mean = output[:, :1].clone().requires_grad_()
    (task.scaler.inverse(mean) * den).sum().backward()
    width = torch.exp(output[:, 1:] / 2) * mean.grad.abs()
    torch.testing.assert_close(values[:, 1:], width)
    torch.testing.assert_close(values[:, :1], (torch.exp(output[:, :1] / 2) - 0) / 3 * den)


def test_output_names_are_the_old_tools() -> None:
    plain = RegressionTask("jet_pt", "ptFromTruthDressedWZJet", input_size=2)
    gauss = RegressionTask("kin", ["mass", "eta"], input_size=2, loss="gaussian_nll")
    also_pt = RegressionTask("pt_huber", "ptFromTruthDressedWZJet", input_size=2, loss="huber")
    two = RegressionTask("two", ["ptFromTruthDressedWZJet", "eta2"], input_size=2)
    assert regression_output_names([plain, gauss]) == {
        "jet_pt": ["ptFromTruthDressedWZJet"],
        "kin": ["mass", "eta", "mass_stddev", "eta_stddev"],
    }
    # a target two tasks regress: named after the task
    assert regression_output_names([plain, also_pt, two]) == {
        "jet_pt": ["jet_pt"],
        "pt_huber": ["pt_huber"],
        "two": ["two_ptFromTruthDressedWZJet", "eta2"],
    }


# ---- config ---------------------------------------------------------------------------------
def with_task(name: str, task: dict, base: str = "GN2"):
    cfg = model_cfg(base)
    cfg.tasks[name] = task
    return cfg


JET_PT = {"type": "regression", "input": "jets", "targets": ["x"], "hidden_layers": [8]}


@pytest.mark.parametrize(
    ("name", "task", "message"),
    [
        (
            "jet_pt",
            {**JET_PT, "label": "y"},
            "model.tasks.jet_pt.targets: a regression task takes label (one target) or "
            "targets (a list), not both",
        ),
        (
            "jet_pt",
            {**JET_PT, "targets": None},
            "model.tasks.jet_pt.targets: missing: a regression task needs label",
        ),
        (
            "jet_pt",
            {**JET_PT, "targets": ["x", "x"]},
            "model.tasks.jet_pt.targets: expected distinct variable names",
        ),
        (
            "jet_pt",
            {**JET_PT, "target_denominators": ["a", "b"]},
            "model.tasks.jet_pt.target_denominators: one variable per target (1: ['x'])",
        ),
        (
            "jet_pt",
            {**JET_PT, "scaling": {"x": {"op": "sqrt"}}},
            "model.tasks.jet_pt.scaling.x.op=sqrt: expected one of log, linear",
        ),
        (
            "jet_pt",
            {**JET_PT, "scaling": {"x": {"op": "log", "x_scale": 0}}},
            "model.tasks.jet_pt.scaling.x.x_scale=0.0: expected a finite number other than 0",
        ),
        (
            "jet_pt",
            {**JET_PT, "scaling": {"y": {"op": "log"}}},
            "model.tasks.jet_pt.scaling.y: not a target of this task; its targets: ['x']",
        ),
        ("jet_pt", {**JET_PT, "scaling": {"x": {}}}, "model.tasks.jet_pt.scaling.x.op"),
        ("jet_pt", {**JET_PT, "scaling": "log"}, "model.tasks.jet_pt.scaling"),
        (
            "jet_pt",
            {**JET_PT, "loss": "nll"},
            "model.tasks.jet_pt.loss: expected one of mse, huber, l1, gaussian_nll, got 'nll'",
        ),
        ("jet_pt", {**JET_PT, "huber_delta": 0}, "model.tasks.jet_pt.huber_delta=0.0"),
        (
            "trk",
            {**JET_PT, "input": "tracks", "sample_weight": "w"},
            "model.tasks.trk.sample_weight: per-jet weights apply to jet classification and "
            "regression tasks",
        ),
        (
            "vtx",
            {"type": "vertexing", "input": "tracks", "label": "v", "sample_weight": "w"},
            "model.tasks.vtx.sample_weight: per-jet weights",
        ),
        (
            "charge",
            {"type": "classification", "input": "jets", "class_names": ["a", "b"]},
            "model.tasks.charge.label: missing: a classification task reads its truth",
        ),
        (
            "charge",
            {
                "type": "classification",
                "input": "jets",
                "label": "q",
                "class_names": ["a", "b"],
                "targets": ["q"],
            },
            "model.tasks.charge.targets: a classification task has no targets",
        ),
    ],
)
def test_config_errors_name_the_key(name: str, task: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ModelConfig.read(with_task(name, task))
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("targets", {"a": 1}),
        ("target_denominators", {"a": 1}),
        ("scaling", ["x"]),
        ("sample_weight", {"a": 1}),
        ("loss", {"a": 1}),
        ("huber_delta", "many"),
    ],
)
def test_a_new_key_of_the_wrong_type_is_one_line_naming_it(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        ModelConfig.read(with_task("jet_pt", {**JET_PT, key: value}))
    message = str(caught.value)
    assert f"model.tasks.jet_pt.{key}" in message and "\n" not in message, message


def test_a_variable_read_as_numbers_and_as_classes_is_a_config_error() -> None:
    cfg = with_task("flav_reg", {**JET_PT, "targets": ["flavour_label"]})
    with pytest.raises(ConfigError, match="flav_reg reads 'flavour_label' of jets as numbers"):
        label_specs(cfg)


def test_label_is_one_target_and_builds_the_same_head() -> None:
    """`label:` (existing configs and saved checkpoints) is a one-target task: the same
    parameters as `targets: [...]`; GN2's tasks are unchanged."""
    one = with_task("pt", {"type": "regression", "input": "jets", "label": "x"})
    many = with_task("pt", {"type": "regression", "input": "jets", "targets": ["x"]})
    torch.manual_seed(0)
    a = build_tagger(one).state_dict()
    torch.manual_seed(0)
    b = build_tagger(many).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    gn2 = build_tagger(model_cfg("GN2")).state_dict()
    assert all(torch.equal(gn2[k], a[k]) for k in gn2)  # the regression head only adds
    specs = label_specs(many)["jets"]
    assert specs["x"] == LabelSpec(continuous=True)


def test_label_specs_read_targets_denominators_and_weights() -> None:
    cfg = with_task(
        "jet_pt",
        {**JET_PT, "targets": ["t"], "target_denominators": ["pt_btagJes"], "sample_weight": "w"},
    )
    cfg.tasks.jet_classification.sample_weight = "w"
    specs = label_specs(cfg)["jets"]
    assert specs["t"] == LabelSpec(continuous=True)
    # a denominator and a weight are no truth: they may be inputs (pt_btagJes is one)
    assert specs["pt_btagJes"] == LabelSpec(continuous=True, truth=False)
    assert specs["w"] == LabelSpec(continuous=True, weight=True, truth=False)
    assert specs["w"].task == "jet_classification"  # named in the loader's messages
    check_no_truth_inputs(ModelConfig.read(cfg).variables, label_specs(cfg))
    # read both as a target and as a denominator: truth
    cfg.tasks.pt_reg = {**JET_PT, "targets": ["pt_btagJes"]}
    assert label_specs(cfg)["jets"]["pt_btagJes"].truth


# ---- the loader on real files ---------------------------------------------------------------
def add_fields(path: Path, dataset: str, fields: dict[str, np.ndarray]) -> None:
    """Rewrite ``dataset`` with ``fields`` set, new ones appended (chunks, compression and
    attributes kept)."""
    with h5py.File(path, "r+") as f:
        old = f[dataset]
        data, attrs = old[...], dict(old.attrs)
        chunks, compression = old.chunks, old.compression
        # a field the file has already (the sample's own truth pt, ...) is overwritten
        new_fields = [(k, v.dtype) for k, v in fields.items() if k not in data.dtype.names]
        dtype = np.dtype(data.dtype.descr + new_fields)
        new = np.zeros(data.shape, dtype=dtype)
        for name in data.dtype.names:
            new[name] = data[name]
        for name, values in fields.items():
            new[name] = values
        del f[dataset]
        ds = f.create_dataset(dataset, data=new, chunks=chunks, compression=compression)
        ds.attrs.update(attrs)


def truth_fields(path: Path, seed: int) -> None:
    """Regression targets, weights, track types and jet charges (signed PDG IDs) made from the
    file's jets and tracks."""
    rng = np.random.default_rng(seed)
    with h5py.File(path) as f:
        jets, tracks = f["jets"][:], f["tracks"][:]
    pt, eta, n = jets["pt_btagJes"], jets["eta_btagJes"], len(jets)
    valid = tracks["valid"]
    charge_ids = {0: [511, -511, 521, -521, 5122, -5122], 1: [421, -421, 411, -411], 2: [0]}
    pdg = [rng.choice(charge_ids.get(int(f), [15, -15])) for f in jets["flavour_label"]]
    types = rng.choice(list(TRACK_TYPE_MAP), size=valid.shape).astype(np.int8)
    add_fields(
        path,
        "jets",
        {
            "ptFromTruthDressedWZJet": (pt * (1.2 + 0.1 * eta)).astype(np.float32),
            "ptFromTruthJet": (pt * (1.1 + rng.normal(0, 0.05, n))).astype(np.float32),
            "truth_mass": (0.1 * pt * (1 + 0.2 * np.abs(eta))).astype(np.float32),
            "truth_eta": (eta + rng.normal(0, 0.01, n)).astype(np.float32),
            "weight": rng.uniform(0.5, 1.5, n).astype(np.float32),
            "HadronGhostInitialTruthLabelPdgId": np.array(pdg, dtype=np.int32),
        },
    )
    d0 = np.where(valid, 2.0 * tracks["d0"], np.nan).astype(np.float32)
    add_fields(path, "tracks", {"ftagTruthTypeLabel": np.where(valid, types, 0), "truth_d0": d0})


def read_labels(path: Path, cfg) -> tuple[dict, dict]:
    reader = FTAGReader(
        path, {"jets": JET_VARS, "tracks": TRACK_VARS}, norm_dict_for(path), label_specs(cfg)
    )
    with h5py.File(path) as f:
        n = len(f["jets"])
    try:
        _, masks, labels = reader.load(0, n)
    finally:
        reader.close()
    return masks, labels


def classification(name: str, input_type: str, label: str, mapping: dict, classes: list) -> dict:
    return {
        "type": "classification",
        "input": input_type,
        "label": label,
        "label_map": mapping,
        "class_names": classes,
        "hidden_layers": [8],
    }


def test_track_type_and_jet_charge_label_maps_through_the_loader(tmp_path: Path) -> None:
    """Negative keys and signed PDG IDs (one beyond float32's integers) map to their classes."""
    path = write_ftag_file(tmp_path / "f.h5", n_jets=80)
    truth_fields(path, seed=1)
    with h5py.File(path, "r+") as f:  # a nucleus' ID, read exactly
        jets = f["jets"][:]
        jets["HadronGhostInitialTruthLabelPdgId"][5] = 1000010020
        f["jets"][...] = jets
        types, valid = f["tracks"]["ftagTruthTypeLabel"], f["tracks"]["valid"]
    cfg = model_cfg("GN2")
    cfg.tasks.track_type = classification(
        "track_type", "tracks", "ftagTruthTypeLabel", TRACK_TYPE_MAP, TRACK_TYPES
    )
    cfg.tasks.jets_charge = classification(
        "jets_charge", "jets", "HadronGhostInitialTruthLabelPdgId", CHARGE_MAP, CHARGE_CLASSES
    )
    _, labels = read_labels(path, cfg)
    expected_types = np.vectorize(TRACK_TYPE_MAP.get)(types)
    got = labels["tracks"]["ftagTruthTypeLabel"]
    assert np.array_equal(got[valid], expected_types[valid]) and (got[~valid] == -1).all()
    assert {-2, -3, -5, -6} <= set(np.unique(types[valid]).tolist())  # negative keys were read
    charges = jets["HadronGhostInitialTruthLabelPdgId"]
    expected = np.array([CHARGE_MAP[int(q)] for q in charges])
    assert np.array_equal(labels["jets"]["HadronGhostInitialTruthLabelPdgId"], expected)
    # the old tool's map verbatim leaves 0..3 as they are; here a map lists every value: one
    # error naming the key, before any data is read
    cfg.tasks.track_type.label_map = OLD_TRACK_TYPE_MAP
    with pytest.raises(ConfigError) as caught:
        label_specs(cfg)
    assert str(caught.value).startswith(
        "model.tasks.track_type.label_map values [2, 3, 4, 5] must be exactly the class "
        "indices 0..5 of class_names (6 classes)"
    )
    # a complete map whose values the file lacks a key for: the loader names them
    cfg.tasks.track_type.label_map = {k: v for k, v in TRACK_TYPE_MAP.items() if k != 3}
    with pytest.raises(DataError) as caught:
        read_labels(path, cfg)
    assert "'tracks' label 'ftagTruthTypeLabel' has values [3] not in its label_map" in str(
        caught.value
    )


def test_targets_denominators_and_weights_through_the_loader(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=40)
    truth_fields(path, seed=2)
    cfg = with_task(
        "jet_pt",
        {
            **JET_PT,
            "targets": ["ptFromTruthDressedWZJet", "truth_mass"],
            "target_denominators": ["pt_btagJes", "pt_btagJes"],
            "sample_weight": "weight",
        },
    )
    cfg.tasks.track_d0 = {**JET_PT, "input": "tracks", "targets": ["truth_d0"]}
    masks, labels = read_labels(path, cfg)
    with h5py.File(path) as f:
        jets, tracks = f["jets"][:], f["tracks"][:]
    for name in ("ptFromTruthDressedWZJet", "truth_mass", "pt_btagJes", "weight"):
        assert labels["jets"][name].dtype == np.float32
        assert np.array_equal(labels["jets"][name], jets[name])
    d0 = labels["tracks"]["truth_d0"]
    assert np.isnan(d0[masks["tracks"]]).all()
    assert np.array_equal(d0[~masks["tracks"]], tracks["truth_d0"][tracks["valid"]])
    # a negative or NaN weight: one error naming the file, variable and key
    for bad in (-0.5, NAN):
        with h5py.File(path, "r+") as f:
            rows = f["jets"][:]
            rows["weight"][7] = bad
            f["jets"][...] = rows
        with pytest.raises(DataError) as caught:
            read_labels(path, cfg)
        message = str(caught.value)
        assert message.startswith(f"{path}: 'jets' variable 'weight' (model.tasks.jet_pt.sample_")
        assert f"has the weight {bad:g} at jet 7" in message
        assert "expected finite weights >= 0" in message


# ---- a run: training, predictions, ONNX -----------------------------------------------------
TASKS = {
    "track_type": {
        **classification("track_type", "tracks", "ftagTruthTypeLabel", TRACK_TYPE_MAP, TRACK_TYPES),
        "context": True,
    },
    "jets_charge": {
        **classification(
            "jets_charge", "jets", "HadronGhostInitialTruthLabelPdgId", CHARGE_MAP, CHARGE_CLASSES
        ),
        "sample_weight": "weight",
    },
    # GN3V01's pt regression: the response to the calibrated pt, L1
    "jet_pt": {
        **JET_PT,
        "targets": None,
        "label": "ptFromTruthDressedWZJet",
        "target_denominators": ["pt_btagJes"],
        "loss": "l1",
    },
    "jet_kin": {  # two targets, one log-scaled (MeV -> GeV), weighted
        **JET_PT,
        "targets": ["truth_mass", "truth_eta"],
        "scaling": {"truth_mass": {"op": "log", "x_scale": 1.0e-3}},
        "sample_weight": "weight",
    },
    "jet_response": {  # Gaussian: mean and width of the response, normalised (mean 1.1, std 0.05)
        **JET_PT,
        "targets": ["ptFromTruthJet"],
        "target_denominators": ["pt_btagJes"],
        "scaling": {"ptFromTruthJet": {"op": "linear", "x_off": -1.1, "op_scale": 20.0}},
        "loss": "gaussian_nll",
    },
    "track_d0": {
        **JET_PT,
        "input": "tracks",
        "targets": ["truth_d0"],
        "loss": "huber",
        "context": True,
    },
}
REGRESSION_TASKS = ("jet_pt", "jet_kin", "jet_response", "track_d0")
JET_OUTPUTS = [
    "GN2_ptFromTruthDressedWZJet",
    "GN2_truth_mass",
    "GN2_truth_eta",
    "GN2_ptFromTruthJet",
    "GN2_ptFromTruthJet_stddev",
]


@pytest.fixture(scope="module")
def truth_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in sample (400 training jets) with the truth fields of `truth_fields`."""
    out = tmp_path_factory.mktemp("regression_sample")
    write_sample(out, 400, seed=7)
    for i, split in enumerate(("train", "val", "test")):
        truth_fields(out / f"{split}.h5", seed=10 + i)
    return out


def add_tasks(cfg, tasks: dict) -> None:
    with open_dict(cfg.model.tasks):
        del cfg.model.tasks["track_vertexing"]  # not needed here: a faster run
        for name, task in tasks.items():
            cfg.model.tasks[name] = OmegaConf.merge(OmegaConf.structured(TaskConfig), task)


@pytest.fixture(scope="module")
def trained_regression(truth_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GN2 (shrunk) with the regression, track-type and charge tasks, trained 2 epochs."""
    from salt.train import train

    logs = tmp_path_factory.mktemp("regression_run")
    files = [f"data.{s}_file={truth_sample / f'{s}.h5'}" for s in ("train", "val", "test")]
    cfg = compose_train(
        *files,
        f"log_dir={logs}",
        "data.batch_size=50",
        "trainer.max_epochs=2",
        "logger=local",
        "logger.log_every_n_steps=1",
        "logger.plots=false",
        "optimizer.max=5.0e-3",
        "optimizer.pct_start=0.1",
    )
    add_tasks(cfg, TASKS)
    train(cfg)
    (run_dir,) = logs.iterdir()
    return run_dir


def test_a_tiny_training_run_reduces_the_regression_losses(trained_regression: Path) -> None:
    rows = [json.loads(line) for line in (trained_regression / "metrics.jsonl").open()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 16  # 2 epochs of 400 / 50 jets
    for task in (*REGRESSION_TASKS, "track_type", "jets_charge"):
        losses = [r[f"train/{task}_loss"] for r in train_rows]
        assert all(math.isfinite(x) for x in losses), task
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), (task, losses)


def test_predictions_of_the_trained_run(trained_regression: Path, truth_sample: Path) -> None:
    """Every new output, finite on real slots, under the old tool's names."""
    result = evaluate(compose_evaluate(trained_regression, "write_tracks=true"))
    with h5py.File(result.predictions) as f:
        jets, tracks = f["jets"][:], f["tracks"][:]
    for name in JET_OUTPUTS:
        assert jets.dtype[name] == np.float32 and np.isfinite(jets[name]).all(), name
    assert (jets["GN2_ptFromTruthJet_stddev"] > 0).all()
    # physical units: a predicted response (16 steps learn little of it) times the jet's pt
    pt = jets["pt_btagJes"]
    for name in ("GN2_ptFromTruthDressedWZJet", "GN2_ptFromTruthJet"):
        assert (jets[name] > 0).all() and np.corrcoef(jets[name], pt)[0, 1] > 0.95, name
    assert "GN2_jets_charge_pbquark" in jets.dtype.names
    valid = tracks["valid"]
    for name in ("GN2_truth_d0", *(f"GN2_p{t}" for t in TRACK_TYPES), "GN2_pfromB"):
        assert name in tracks.dtype.names, name
    assert np.isfinite(tracks["GN2_truth_d0"][valid]).all()
    assert np.isnan(tracks["GN2_truth_d0"][~valid]).all()
    probs = np.stack([tracks[f"GN2_p{t}"] for t in TRACK_TYPES], -1).astype(np.float32)
    np.testing.assert_allclose(probs[valid].sum(-1), 1.0, atol=5e-3)
    assert (probs[~valid] == 0).all()
    assert {"truth_d0", "ftagTruthTypeLabel"} <= set(tracks.dtype.names)  # the truth beside


def set_head_output(state: dict, task: str, values: list[float]) -> None:
    """The task's head outputs ``values`` for every jet (object): last layer's weight 0."""
    prefix = f"tasks.{task}.net.rest."
    last = max(
        (k for k in state if k.startswith(prefix) and k.endswith(".weight")),
        key=lambda k: int(k[len(prefix) :].split(".")[0]),
    )
    state[last] = torch.zeros_like(state[last])
    state[last.replace(".weight", ".bias")] = torch.tensor(values)


def known_output_run(tmp_path: Path, sample: Path, tasks: dict, heads: dict) -> Path:
    run_dir = make_run_dir(tmp_path, sample, tasks=tasks)
    (path,) = (run_dir / "ckpts").iterdir()
    state = ckpt.load_checkpoint(path)
    for task, values in heads.items():
        set_head_output(state["model"], task, values)
    ckpt.save_checkpoint(state, path)
    return run_dir


HEADS = {
    "jet_pt": [1.25],  # the response: 1.25 x pt_btagJes
    "jet_kin": [3.0, -0.5],  # log(m / GeV) = 3, eta = -0.5
    "jet_response": [0.4, math.log(0.25)],  # (r - 1.1) * 20 = 0.4, width 0.5 in those units
    "track_d0": [0.125],
}


def test_predictions_are_in_physical_units(
    truth_sample: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Heads set to known values: the file holds them through the inverse scaling, times the
    denominators of the test file; σ by the delta method; NaN on padded slots. In float16
    (half_precision) a pt in MeV beyond 65504 is inf: warned."""
    run_dir = known_output_run(tmp_path, truth_sample, TASKS, HEADS)
    result = evaluate(compose_evaluate(run_dir, "write_tracks=true", "data.num_test=60"))
    with h5py.File(result.predictions) as f, h5py.File(truth_sample / "test.h5") as src:
        jets, tracks, pt = f["jets"][:], f["tracks"][:], src["jets"]["pt_btagJes"][:60]
    assert [n for n in jets.dtype.names if n in JET_OUTPUTS] == JET_OUTPUTS
    np.testing.assert_allclose(jets["GN2_ptFromTruthDressedWZJet"], 1.25 * pt, rtol=1e-6)
    np.testing.assert_allclose(jets["GN2_truth_mass"], math.exp(3.0) * 1e3, rtol=1e-6)
    np.testing.assert_allclose(jets["GN2_truth_eta"], -0.5, rtol=1e-6)
    np.testing.assert_allclose(jets["GN2_ptFromTruthJet"], (1.1 + 0.4 / 20) * pt, rtol=1e-6)
    np.testing.assert_allclose(jets["GN2_ptFromTruthJet_stddev"], 0.5 / 20 * pt, rtol=1e-5)
    valid = tracks["valid"]
    assert (tracks["GN2_truth_d0"][valid] == 0.125).all()
    assert np.isnan(tracks["GN2_truth_d0"][~valid]).all()
    assert "beyond" not in caplog.text
    half = evaluate(
        compose_evaluate(run_dir, "half_precision=true", "data.num_test=60", "data.test_suffix=h")
    )
    with h5py.File(half.predictions) as f:
        pt_half = f["jets"]["GN2_ptFromTruthDressedWZJet"]
    assert pt_half.dtype == np.float16 and np.isinf(pt_half[1.25 * pt > 65504]).all()
    assert "GN2_ptFromTruthDressedWZJet: predicted values beyond float16's range" in caplog.text


# ---- ONNX ----------------------------------------------------------------------------------
EXPORTED = (
    "tasks=[jet_classification,jet_pt,jet_kin,jet_response,jets_charge,track_origin,track_type]"
)


def test_onnx_export_of_regression_and_track_types(
    trained_regression: Path, truth_sample: Path
) -> None:
    """Float scalars in physical units (the denominator from jet_features in the graph),
    <model>_TrackType int8 per track; parity jet by jet, and the predictions file agrees."""
    pytest.importorskip("onnxruntime")
    from salt.export import export
    from salt.onnx.model import graph_schema
    from salt.onnx.parity import session
    from tests.test_export import compose_export

    out = trained_regression / "regression.onnx"
    result = export(
        compose_export(trained_regression, EXPORTED, f"output={out}", "parity.num_jets=40")
    )
    assert not result.parity.failures()
    assert result.parity.outputs["GN2_ptFromTruthDressedWZJet"].relative
    model_bytes = out.read_bytes()
    outputs = graph_schema(model_bytes)["outputs"]
    for name in JET_OUTPUTS:
        assert outputs[name] == {"dtype": "float32", "shape": []}, name
    assert outputs["GN2_TrackType"] == {"dtype": "int8", "shape": ["n_tracks"]}
    assert outputs["GN2_TrackOrigin"] == {"dtype": "int8", "shape": ["n_tracks"]}
    # one jet through onnxruntime against the predictions file of the same checkpoint
    preds = evaluate(
        compose_evaluate(trained_regression, "data.num_test=5", "data.test_suffix=onnx")
    )
    with h5py.File(preds.predictions) as f, h5py.File(truth_sample / "test.h5") as src:
        jets = f["jets"][:]
        variables = yaml_variables(trained_regression)
        raw_jets = np.stack([src["jets"][v][:5] for v in variables["jets"]], -1)
        tracks = src["tracks"][:5]
    sess = session(model_bytes)
    names = [o.name for o in sess.get_outputs()]
    for i in range(5):
        real = tracks[i][tracks[i]["valid"]]
        feed = {
            "jet_features": raw_jets[i : i + 1].astype(np.float32),
            "track_features": np.stack(
                [real[v].astype(np.float32) for v in variables["tracks"]], -1
            ),
        }
        got = dict(zip(names, sess.run(names, feed), strict=True))
        for name in JET_OUTPUTS:
            assert got[name] == pytest.approx(jets[name][i], rel=1e-5), name


def yaml_variables(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["variables"]


def test_onnx_export_errors_name_the_task(truth_sample: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from salt.export import export
    from tests.test_export import compose_export

    tasks = {
        "ntrk_ratio": {**JET_PT, "targets": ["truth_mass"], "target_denominators": ["n_tracks"]}
    }
    run_dir = make_run_dir(tmp_path, truth_sample, tasks=tasks)
    with pytest.raises(ExportError) as caught:
        export(compose_export(run_dir, "parity.num_jets=5"))
    message = str(caught.value)
    assert message.startswith("task ntrk_ratio: its target denominator 'n_tracks' is not a jet")
    assert "add it to model.variables.jets" in message and "export without that task" in message
    # without it the model exports
    export(compose_export(run_dir, "tasks=[jet_classification]", "parity.num_jets=5"))
    run_dir = make_run_dir(tmp_path / "b", truth_sample, tasks={"track_d0": TASKS["track_d0"]})
    with pytest.raises(ExportError, match="task track_d0: a regression on tracks has no ONNX"):
        export(compose_export(run_dir, "tasks=[jet_classification,track_d0]"))
