"""Edge features between objects (`model.edges`, salt.models.edges): the features against a
hand computation, the raw kinematics from the normalised inputs, the bias on the padded and
packed layouts (the same function, fp64), what it changes (and what zeroing it gives back),
permutation symmetry, training, and the config errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from salt.data.ftag import input_norm
from salt.errors import ConfigError
from salt.export import export
from salt.models import Tagger, build_tagger
from salt.models.edges import MIN_MASS2, EdgeInputs, pair_features
from salt.models.tagger import ModelConfig
from salt.onnx.model import graph_schema
from salt.training.device_batches import object_counts
from salt.training.loop import forward, setup, train_step
from tests.test_evaluate import make_run_dir
from tests.test_export import ALL_TASKS, compose_export
from tests.test_models_objects import TYPES, make_batch, multi_cfg
from tests.test_train import cpu, make_cfg

FEATURES = ["dR", "kt", "z", "mass"]
# the test types' kinematics: their first four variables (electrons: none)
KINEMATICS = {
    t: {"pt": f"{t}_0", "eta": f"{t}_1", "phi": f"{t}_2", "energy": f"{t}_3"}
    for t in ("tracks", "flows")
}
# normalisation of the test types' variables: random normal inputs become pt around 10 GeV,
# eta around 0, phi around 3 (across the wrap-around at pi), energy around 20 GeV
NORM = {
    **{
        t: {
            f"{t}_{i}": {"mean": m, "std": s}
            for i, (m, s) in enumerate([(1e4, 3e3), (0.0, 0.3), (3.0, 0.5), (2e4, 3e3), (0, 1)])
            if i < n
        }
        for t, n in TYPES.items()
    },
    "jets": {"pt": {"mean": 5e4, "std": 2e4}, "eta": {"mean": 0.0, "std": 1.0}},
}


def edge_cfg(attention: str | None = None, **edges: object):
    cfg = multi_cfg(attention)
    cfg.edges = {"features": FEATURES, "kinematics": KINEMATICS, "hidden_layers": [8], **edges}
    return cfg


def edge_tagger(cfg, seed: int = 0) -> Tagger:
    torch.manual_seed(seed)
    return build_tagger(cfg, input_norm=input_norm(NORM)).double()


def double(batch: dict) -> dict:
    return {
        k: {n: v.double() if v.is_floating_point() else v for n, v in d.items()}
        if k != "labels"
        else d
        for k, d in batch.items()
    }


# ---- the features -----------------------------------------------------------------------------
# (pt MeV, eta, phi, mass MeV): a and b across phi = pi, c and d in the same direction
OBJECTS = [
    (2e4, 0.5, 3.1, 2e3),
    (5e3, 0.45, -3.1, 1e3),
    (1e3, -0.2, 0.3, 300.0),
    (3e3, -0.2, 0.3, 500.0),
]


def four_vectors(objects) -> np.ndarray:
    """(pt, eta, phi, E) of (pt, eta, phi, m)."""
    return np.array(
        [(pt, eta, phi, math.hypot(pt * math.cosh(eta), m)) for pt, eta, phi, m in objects]
    )


def by_hand(kin: np.ndarray) -> np.ndarray:
    """The old tool's definitions pair by pair (dphi wrapped both ways), non-finite -> 0."""
    n = len(kin)
    out = np.zeros((n, n, 4))
    for i in range(n):
        for j in range(n):
            pt_i, eta_i, phi_i, e_i = kin[i]
            pt_j, eta_j, phi_j, e_j = kin[j]
            dphi = phi_j - phi_i
            while dphi >= math.pi:
                dphi -= 2 * math.pi
            while dphi < -math.pi:
                dphi += 2 * math.pi
            dr = math.sqrt((eta_j - eta_i) ** 2 + dphi**2)
            px = pt_i * math.cos(phi_i) + pt_j * math.cos(phi_j)
            py = pt_i * math.sin(phi_i) + pt_j * math.sin(phi_j)
            pz = pt_i * math.sinh(eta_i) + pt_j * math.sinh(eta_j)
            mass2 = (e_i + e_j) ** 2 - px**2 - py**2 - pz**2
            with np.errstate(divide="ignore"):
                values = [
                    np.log(dr),
                    np.log(min(pt_i, pt_j) * dr),
                    np.log(min(pt_i, pt_j) / (pt_i + pt_j)),
                    0.5 * np.log(max(mass2, MIN_MASS2)),
                ]
            out[i, j] = [v if np.isfinite(v) else 0.0 for v in values]
    return out


def test_features_are_the_old_tools_by_hand() -> None:
    kin = four_vectors(OBJECTS)
    got = pair_features(torch.tensor(kin), FEATURES).numpy()
    np.testing.assert_allclose(got, by_hand(kin), rtol=1e-9, atol=1e-12)
    # a and b: dphi across the wrap-around, 2 pi - 6.2, both ways round
    expected = math.log(math.hypot(0.05, 2 * math.pi - 6.2))
    assert got[0, 1, 0] == pytest.approx(expected) and got[1, 0, 0] == pytest.approx(expected)
    np.testing.assert_allclose(got, got.transpose(1, 0, 2), rtol=1e-9)  # symmetric
    # self pairs: ln dR = ln kt = 0 (ln 0), z = 1/2, mass 2 m; c and d: same direction
    for k, (_, _, _, m) in enumerate(OBJECTS):
        np.testing.assert_allclose(got[k, k], [0.0, 0.0, math.log(0.5), math.log(2 * m)])
    assert got[2, 3, 0] == got[2, 3, 1] == 0.0
    # a subset, in the order asked
    np.testing.assert_array_equal(
        pair_features(torch.tensor(kin), ["mass", "dR"]).numpy(), got[..., [3, 0]]
    )


def test_massless_objects_give_the_same_features_in_float32() -> None:
    """Massless objects (E = |p|, rounded in float32): their own m^2 is rounding noise, which
    counts as 0, so self and collinear pairs have the clamp's ln m, other pairs their angular
    mass, the same from float32 inputs as from exact ones."""
    g = np.random.default_rng(1)
    pt = g.uniform(1e3, 2e5, 12)
    eta, phi = g.uniform(-2.5, 2.5, 12), g.uniform(-math.pi, math.pi, 12)
    eta[1], phi[1] = eta[0], phi[0]  # a collinear pair
    kin = np.stack([pt, eta, phi, pt * np.cosh(eta)], axis=-1)
    exact = pair_features(torch.tensor(kin), FEATURES).numpy()
    f32 = pair_features(torch.tensor(kin, dtype=torch.float32), FEATURES).numpy()
    floor = 0.5 * math.log(MIN_MASS2)
    assert (np.diagonal(exact[..., 3]) == floor).all() and exact[0, 1, 3] == floor
    np.testing.assert_allclose(f32, exact, rtol=1e-5, atol=1e-5)
    # the old formula where it is well conditioned (masses of distinct, separated pairs)
    reference = by_hand(kin)[..., 3]
    apart = ~np.eye(12, dtype=bool)
    apart[0, 1] = apart[1, 0] = False
    np.testing.assert_allclose(exact[..., 3][apart], reference[apart], rtol=1e-6)


def test_raw_kinematics_from_the_normalised_inputs() -> None:
    """`EdgeInputs` undoes the loader's normalisation; `jet_eta` adds the jet's eta."""
    cfg = ModelConfig.read(edge_cfg(jet_eta="eta"))
    assert cfg.edges.enabled
    raw = torch.tensor(four_vectors(OBJECTS), dtype=torch.float32)[None]  # one jet
    flows = torch.zeros(1, len(OBJECTS), TYPES["flows"])
    norm = NORM["flows"]
    for col, name in enumerate(["flows_0", "flows_1", "flows_2", "flows_3"]):
        flows[..., col] = (raw[..., col] - norm[name]["mean"]) / norm[name]["std"]
    jets = torch.tensor([[0.0, 1.5]])  # normalised: jet eta 1.5
    inputs = EdgeInputs(cfg.variables, cfg.edges, input_norm(NORM))
    out = inputs({"flows": flows, "electrons": torch.ones(1, 2, 3)}, jets)
    expected = raw.clone()
    expected[..., 1] += 1.5
    torch.testing.assert_close(out["flows"][..., :4], expected, rtol=1e-6, atol=1e-4)
    assert (out["flows"][..., 4] == 1).all()
    assert (out["electrons"] == 0).all()  # no kinematics: no bias


# ---- the bias in the tagger -------------------------------------------------------------------
def run_backend(tagger: Tagger, batch: dict, backend: str) -> tuple[dict, dict]:
    tagger.backend = backend
    tagger.zero_grad(set_to_none=True)
    outputs, losses = tagger(
        batch["inputs"],
        batch["pad_masks"],
        batch["labels"],
        jets_per_size=object_counts(batch["pad_masks"]),
    )
    losses["loss"].backward()
    grads = {}
    for name, p in tagger.named_parameters():
        assert p.grad is not None, f"{name}: no gradient ({backend})"
        grads[name] = p.grad.clone()
    return outputs, grads


@pytest.mark.parametrize(
    ("attention", "every_layer", "registers"),
    [
        ("scaled_dot_product", True, 1),
        ("gatv2", True, 1),
        ("scaled_dot_product", False, 0),
        ("scaled_dot_product", True, 3),
    ],
)
def test_packed_layout_equals_the_padded_one(
    attention: str, every_layer: bool, registers: int
) -> None:
    """Tracks and flows with kinematics, electrons without: outputs and every gradient."""
    cfg = edge_cfg(attention, every_layer=every_layer)
    cfg.encoder.num_registers = registers
    tagger = edge_tagger(cfg)
    batch = double(make_batch(tagger))
    padded, padded_grads = run_backend(tagger, batch, "padded")
    packed, packed_grads = run_backend(tagger, batch, "packed")
    for got, expected in ((packed, padded), (packed_grads, padded_grads)):
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-11, msg=key)
    assert padded_grads["encoder.edge_bias.net.first.linear.weight"].abs().sum() > 0


def test_bias_is_zero_on_pairs_without_kinematics() -> None:
    """Electrons (no kinematics), padded slots and the registers: bias 0 on all their pairs;
    pairs of tracks and flows, across the types too, get the MLP's value."""
    cfg = edge_cfg()
    cfg.encoder.num_registers = 2
    tagger = edge_tagger(cfg)
    batch = double(make_batch(tagger))
    objects = {t: batch["inputs"][t] for t in tagger.object_types}
    edges = tagger._edges(objects, batch["inputs"]["jets"])
    assert edges is not None
    masks = [batch["pad_masks"][t] for t in tagger.object_types]
    pad = torch.cat([*masks, torch.zeros(8, 2, dtype=torch.bool)], 1)
    edges = torch.cat([edges, edges.new_zeros(8, 2, edges.shape[-1])], 1)
    bias = tagger.encoder.edge_bias.padded(edges, pad)  # [B, H, T, T]
    slots = {"tracks": 7, "flows": 6, "electrons": 2, "registers": 2}
    kind = [t for t, n in slots.items() for _ in range(n)]
    with_kin = torch.tensor([k in ("tracks", "flows") for k in kind]) & ~pad
    pairs = (with_kin[:, :, None] & with_kin[:, None, :])[:, None].expand_as(bias)
    assert (bias[~pairs] == 0).all()
    assert (bias[pairs] != 0).all()
    track_flow = bias[:, :, :7, 7:13][pairs[:, :, :7, 7:13]]
    assert track_flow.numel() > 0


def test_edges_change_the_output_and_a_zero_bias_gives_it_back() -> None:
    """From the same seed, a model with edges has the weights of the one without, and its pair
    MLP; with the MLP's last layer zero, the bias is zero and the outputs are the same."""
    torch.manual_seed(3)
    plain = build_tagger(multi_cfg()).double().eval()
    tagger = edge_tagger(edge_cfg(), seed=3).eval()
    weights, edged = plain.state_dict(), tagger.state_dict()
    assert {k for k in edged if k not in weights} == {
        k for k in edged if k.startswith("encoder.edge_bias.")
    }
    for key, value in weights.items():
        assert torch.equal(edged[key], value), key
    batch = double(make_batch(tagger))
    for backend in ("padded", "packed"):
        plain.backend = tagger.backend = backend
        expected, _ = plain(batch["inputs"], batch["pad_masks"])
        got, _ = tagger(batch["inputs"], batch["pad_masks"])
        assert (got["jet_classification"] - expected["jet_classification"]).abs().max() > 1e-3
    last = tagger.encoder.edge_bias.net.rest[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    for backend in ("padded", "packed"):
        plain.backend = tagger.backend = backend
        expected, _ = plain(batch["inputs"], batch["pad_masks"])
        got, _ = tagger(batch["inputs"], batch["pad_masks"])
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12, msg=key)


def test_permuting_the_objects_permutes_the_outputs() -> None:
    tagger = edge_tagger(edge_cfg()).eval()
    batch = double(make_batch(tagger, seed=5))
    g = torch.Generator().manual_seed(6)
    orders = {t: torch.randperm(batch["pad_masks"][t].shape[1], generator=g) for t in TYPES}
    permuted = copy.deepcopy(batch)
    for t, order in orders.items():
        permuted["inputs"][t] = batch["inputs"][t][:, order]
        permuted["pad_masks"][t] = batch["pad_masks"][t][:, order]
    for backend in ("padded", "packed"):
        tagger.backend = backend
        out, _ = tagger(batch["inputs"], batch["pad_masks"])
        got, _ = tagger(permuted["inputs"], permuted["pad_masks"])
        torch.testing.assert_close(got["jet_classification"], out["jet_classification"])
        tracks = orders["tracks"]
        torch.testing.assert_close(got["track_origin"], out["track_origin"][:, tracks])
        torch.testing.assert_close(
            got["track_vertexing"], out["track_vertexing"][:, tracks][:, :, tracks]
        )
        torch.testing.assert_close(got["flow_charge"], out["flow_charge"][:, orders["flows"]])


def test_a_tagger_built_without_the_normalisation_does_not_run() -> None:
    tagger = build_tagger(edge_cfg())
    batch = make_batch(tagger)
    with pytest.raises(RuntimeError, match="built without the normalisation"):
        tagger(batch["inputs"], batch["pad_masks"])


def test_varlen_is_refused_and_auto_never_chooses_it() -> None:
    tagger = edge_tagger(edge_cfg())
    with pytest.raises(ConfigError, match=r"backend=varlen cannot add model\.edges' bias"):
        tagger.backend = "varlen"
    cfg = edge_cfg()
    cfg.attention.backend = "varlen"
    with pytest.raises(ConfigError, match=r"^model\.attention\.backend=varlen cannot add"):
        build_tagger(cfg)
    tagger.backend = "auto"
    assert tagger.layout(torch.device("cpu")) == "packed"


def test_auto_on_a_gpu_takes_the_padded_layout_with_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where `auto` would take varlen (CUDA, bf16 autocast, the kernel there), edges take padded."""
    monkeypatch.setattr("salt.models.tagger.varlen_kernel", lambda: object())
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: True)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda *args: torch.bfloat16)
    cuda = torch.device("cuda")
    assert build_tagger(multi_cfg()).layout(cuda) == "varlen"
    assert edge_tagger(edge_cfg()).layout(cuda) == "padded"


# ---- config errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edges", "message"),
    [
        ({"features": ["dR", "dEta"]}, r"^model\.edges\.features: Invalid value 'dEta'"),
        (
            {"features": []},
            r"^model\.edges\.features is empty \(edges off\) but model\.edges\.kinematics is set",
        ),
        ({"features": ["z", "z"]}, r"^model\.edges\.features: duplicated feature\(s\) \['z'\]"),
        (
            {
                "kinematics": {
                    **KINEMATICS,
                    "tracks": {"pt": "tracks_0", "eta": "tracks_1", "phi": "tracks_2"},
                }
            },
            r"^model\.edges\.kinematics\.tracks\.energy: not set, but the feature\(s\) \['mass'\]",
        ),
        (
            {"features": ["dR"], "kinematics": {"flows": {"eta": "flows_1"}}},
            r"^model\.edges\.kinematics\.flows\.phi: not set",
        ),
        ({"kinematics": {}}, r"^model\.edges\.kinematics: name the kinematic variables"),
        (
            {"kinematics": {"muons": KINEMATICS["flows"]}},
            r"^model\.edges\.kinematics\.muons: 'muons' is not an object type",
        ),
        (
            {"kinematics": {"jets": KINEMATICS["flows"]}},
            r"^model\.edges\.kinematics\.jets: 'jets' is not an object type",
        ),
        (
            {"kinematics": {"flows": {**KINEMATICS["flows"], "pt": "pT"}}},
            r"^model\.edges\.kinematics\.flows\.pt: 'pT' is not one of model\.variables\.flows",
        ),
        (
            {"kinematics": {"flows": {"ptt": "flows_0"}}},
            r"^model\.edges\.kinematics\.flows\.ptt: unknown key; did you mean pt\?",
        ),
        (
            {"jet_eta": "eta_btagJes"},
            r"^model\.edges\.jet_eta: 'eta_btagJes' is not one of model\.variables\.jets",
        ),
        ({"hidden_layers": [0]}, r"^model\.edges\.hidden_layers\[0\] must be a positive int"),
        ({"activation": "Linear"}, r"^model\.edges\.activation: activation 'Linear'"),
    ],
)
def test_config_errors_name_the_key(edges: dict, message: str) -> None:
    cfg = edge_cfg()
    cfg.edges = {**cfg.edges, **edges}
    with pytest.raises(ConfigError, match=message):
        build_tagger(cfg)


def test_edges_off_is_every_model_as_before() -> None:
    """No features (the configs' default) builds nothing: no edge module, parameter or
    buffer."""
    tagger = build_tagger(multi_cfg())
    assert tagger.edge_inputs is None and tagger.encoder.edge_bias is None
    assert not any("edge" in name for name in tagger.state_dict())
    assert ModelConfig.read(multi_cfg()).plain()["edges"]["features"] == []


def test_edges_are_switched_on_from_the_command_line() -> None:
    """Key by key, a new object type's kinematics added with `+` (no config file needed)."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    overrides = [
        "model=GN3",
        "model.edges.features=[dR,kt,z,mass]",
        "model.edges.jet_eta=eta_btagJes",
        "+model.edges.kinematics.flows={pt: pt, eta: deta, phi: dphi, energy: energy}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=overrides)
    edges = ModelConfig.read(cfg.model).edges
    assert edges.enabled and dict(edges.kinematics["flows"])["energy"] == "energy"
    tagger = build_tagger(cfg.model, loss_weights=False)
    assert tagger.edge_inputs is not None and tagger.encoder.edge_bias is not None


# ---- training and export on the built-in sample ----------------------------------------------
# the flows with every feature (deta and dphi to the jet axis: jet_eta gives the mass the
# absolute eta); the tracks and electrons get no bias
SAMPLE_OBJECTS = {
    "flows": ["pt", "energy", "deta", "dphi", "isCharged"],
    "electrons": ["pt", "ptfrac", "dr", "eProbabilityHT"],
}
SAMPLE_EDGES = {
    "features": FEATURES,
    "kinematics": {"flows": {"pt": "pt", "eta": "deta", "phi": "dphi", "energy": "energy"}},
    "jet_eta": "eta_btagJes",
    "hidden_layers": [8],
}


def test_training_with_edges_reduces_the_loss(tmp_path: Path, sample_cache: Path) -> None:
    """A model config with edges (as a user may write one, in a config directory of their
    own), set up as `salt.train` does (the norm_dict
    reaches the edges), then steps on one batch."""
    model = {"defaults": ["GN2", "_self_"], "variables": SAMPLE_OBJECTS, "edges": SAMPLE_EDGES}
    (tmp_path / "conf" / "model").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(model), tmp_path / "conf" / "model" / "GN2E.yaml")
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    steps = ["trainer.fast_dev_run=25", "optimizer.max=5e-3"]
    cfg = make_cfg(tmp_path, sample_cache, search, "model=GN2E", *steps)
    run = setup(cfg, cpu())
    assert run.tagger.edge_inputs is not None and run.tagger.edge_inputs.ready
    batch = next(iter(run.train_batches))
    inputs = batch.tensors["inputs"]
    edges = run.tagger.edge_inputs({"flows": inputs["flows"]}, inputs["jets"])["flows"]
    real = ~batch.tensors["pad_masks"]["flows"]
    pt, energy = edges[..., 0][real], edges[..., 3][real]
    assert (pt > 400).all()  # MeV, back from the normalised inputs (the sample's cut: 500)
    # massless: E = pt cosh(eta), with the jet's eta added back to deta
    torch.testing.assert_close(energy, pt * torch.cosh(edges[..., 1][real]), rtol=1e-4, atol=0)
    weight = run.tagger.encoder.edge_bias.net.first.linear.weight.detach().clone()

    def loss() -> float:
        run.model.eval()
        with torch.no_grad():
            value = float(forward(run, batch.tensors, batch.jets_per_size)[1]["loss"])
        run.model.train()
        return value

    before = loss()
    for _ in range(25):
        train_step(run, batch)
    after = loss()
    assert after < 0.9 * before, (before, after)
    assert not torch.equal(run.tagger.encoder.edge_bias.net.first.linear.weight, weight)


def test_export_with_edges_passes_the_parity_check(sample: Path, tmp_path: Path) -> None:
    """The graph normalises its raw inputs, the tagger un-normalises the kinematics: onnxruntime
    one jet at a time agrees with batched torch."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    run_dir = make_run_dir(
        tmp_path,
        sample,
        *[f"+model.variables.{t}=[{','.join(names)}]" for t, names in SAMPLE_OBJECTS.items()],
        "model.embed_dim=32",
        "model.init_net.hidden_layers=[32]",
        "model.encoder.num_layers=2",
        "model.attention.num_heads=4",
        model={"edges": SAMPLE_EDGES},
    )
    result = export(compose_export(run_dir, ALL_TASKS, "parity.num_jets=80"))
    assert not result.parity.failures() and result.max_difference <= 1e-5
    model_bytes = result.path.read_bytes()
    ops = {node.op_type for node in onnx.load_from_string(model_bytes).graph.node}
    assert {"Sin", "Exp", "Log"} <= ops  # the pair features are in the graph
    assert list(graph_schema(model_bytes)["inputs"]) == [
        "jet_features",
        "track_features",
        "flow_features",
        "electron_features",
    ]
