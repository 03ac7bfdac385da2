"""ONNX export in the interface of ATLAS's inference code: the graph's schema (fixed, from the old
tool's exporter), its metadata, onnxruntime one jet at a time against batched torch on real
jets (0, 1 and 40 tracks; the predictions file), the export options, `salt.onnx_info`,
`salt.onnx_compare` and the errors. GN2: a copy of the session's trained run
(tests/conftest.py); the other architectures: run directories built without training (seeded
weights), parity does not need a good model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from salt.data.ftag import norm_arrays
from salt.errors import ConfigError, ExportError
from salt.evaluate import evaluate
from salt.evaluation.run import load_run
from salt.export import export
from salt.onnx.model import graph_schema, read_gnn_config
from salt.onnx.parity import raw_features, session
from salt.training import checkpoint as ckpt
from tests.conftest import (
    CONF,
    MATRIX,
    EvaluatedRun,
    TrainedRun,
    combo_id,
    copy_run,
    entry_point_error,
    fill_disk,
    group_overrides,
    read_only_view,
    small_tmpfs,
)
from tests.test_evaluate import compose_evaluate, make_run_dir

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ALL_TASKS = "tasks=[jet_classification,track_origin,track_vertexing]"
TRACK_VARS = 19

# What the old tool's exporter (salt-ml salt/onnx/to_onnx.py) writes for GN2 with
# --tasks jets_classification track_origin track_vertexing: one jet per call, the track axis
# named n_tracks, float scalars per class (its get_onnx squeezes [1, 1]), int8 per track.
EXPECTED_SCHEMA = {
    "inputs": {
        "jet_features": {"dtype": "float32", "shape": [1, 2]},
        "track_features": {"dtype": "float32", "shape": ["n_tracks", TRACK_VARS]},
    },
    "outputs": {
        "GN2_pb": {"dtype": "float32", "shape": []},
        "GN2_pc": {"dtype": "float32", "shape": []},
        "GN2_pu": {"dtype": "float32", "shape": []},
        "GN2_ptau": {"dtype": "float32", "shape": []},
        "GN2_TrackOrigin": {"dtype": "int8", "shape": ["n_tracks"]},
        "GN2_VertexIndex": {"dtype": "int8", "shape": ["n_tracks"]},
    },
}
# the keys of the old tool's gnn_config (add_metadata in to_onnx.py)
OLD_TOOL_KEYS = {
    "ckpt_path",
    "layers",
    "nodes",
    "config.yaml",
    "metadata.yaml",
    "salt_export_hash",
    "forced_export",
    "onnx_model_version",
    "output_names",
    "model_name",
    "inputs",
    "input_sequences",
    "combine_outputs",
    "rename_outputs",
}


def compose_export(run_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("export", overrides=[f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def gn2(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained run (exports write into it)."""
    return copy_run(trained_run.run_dir, tmp_path_factory.mktemp("gn2"))


@pytest.fixture(scope="module")
def full_export(gn2: Path):
    """GN2 exported with its track outputs, checked on all 750 test jets."""
    return export(compose_export(gn2, ALL_TASKS, "output=" + str(gn2 / "full.onnx")))


def run_jet(model: bytes, jet: np.ndarray, tracks: np.ndarray) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    got = sess.run(names, {"jet_features": jet[None], "track_features": tracks})
    return dict(zip(names, got, strict=True))


# ---- the interface --------------------------------------------------------------------------
def test_graph_schema_is_the_old_tools(full_export) -> None:
    model_bytes = full_export.path.read_bytes()
    assert graph_schema(model_bytes) == EXPECTED_SCHEMA
    model = onnx.load_from_string(model_bytes)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [20]
    assert model.doc_string == "GN2"
    assert [p.key for p in model.metadata_props] == ["gnn_config"]


def test_gnn_config_metadata(full_export, gn2: Path, sample: Path) -> None:
    meta = read_gnn_config(full_export.path.read_bytes(), full_export.path)
    assert set(meta) >= OLD_TOOL_KEYS
    assert meta["model_name"] == "GN2" and meta["onnx_model_version"] == "v1"
    assert meta["output_names"] == list(EXPECTED_SCHEMA["outputs"])
    # Athena's names: the jet variables without _btagJes, the track sequence with its selection;
    # offsets 0 and scales 1 because the graph normalises
    assert meta["inputs"] == [
        {
            "name": "jet_var",
            "variables": [
                {"name": "pt", "offset": 0.0, "scale": 1.0},
                {"name": "eta", "offset": 0.0, "scale": 1.0},
            ],
        }
    ]
    (sequence,) = meta["input_sequences"]
    assert sequence["name"] == "tracks_r22default_sd0sort"
    config = yaml.safe_load((gn2 / "config.yaml").read_text())
    track_vars = config["model"]["variables"]["tracks"]
    assert [v["name"] for v in sequence["variables"]] == track_vars
    assert meta["config.yaml"] == config
    assert meta["metadata.yaml"] == yaml.safe_load((gn2 / "metadata.yaml").read_text())
    assert meta["ckpt_path"] == str(ckpt.best_checkpoint(gn2 / "ckpts").resolve())
    assert len(meta["salt_export_hash"]) == 40  # the commit of the salt checkout
    norm = yaml.safe_load((sample / "norm_dict.yaml").read_text())
    assert meta["normalisation"]["applied_in_graph"] is True
    for var in track_vars:
        assert meta["normalisation"]["tracks"][var] == norm["tracks"][var]


def test_default_export_has_the_jet_outputs_in_the_run_directory(gn2: Path) -> None:
    result = export(compose_export(gn2, "parity.num_jets=100"))
    assert result.path == gn2 / "network.onnx"  # the old tool's name and place
    schema = graph_schema(result.path.read_bytes())
    assert list(schema["outputs"]) == ["GN2_pb", "GN2_pc", "GN2_pu", "GN2_ptau"]


# ---- proof: onnxruntime per jet equals torch ------------------------------------------------
def test_parity_on_every_test_jet_one_at_a_time(full_export) -> None:
    """The export's own check: every jet of the test file through onnxruntime alone vs the
    batched torch evaluation."""
    parity = full_export.parity
    assert parity.jets == 750
    for name, out in parity.outputs.items():
        if name in ("GN2_TrackOrigin", "GN2_VertexIndex"):
            assert out.differing == 0 and out.values > 5000, out
        else:
            assert out.values == 750 and 0 < out.max_difference <= 1e-5, out


@pytest.mark.parametrize("num_tracks", [0, 1, 40])
def test_parity_for_0_1_and_40_tracks(full_export, gn2: Path, sample: Path, num_tracks) -> None:
    """A real jet with 0, 1 or 40 real tracks (taken from the test file's jets), run alone by
    onnxruntime, against torch on a padded batch of jets of other sizes (normalised here)."""
    run = load_run(gn2)
    names = run.variables
    with h5py.File(sample / "test.h5") as f:
        jets = raw_features(f, "jets", names["jets"], slice(0, 3))
        tracks = raw_features(f, "tracks", names["tracks"], slice(0, 40))
        valid = f["tracks"]["valid"][:40]
    pool = tracks[valid]  # real tracks of 40 jets
    sizes = [num_tracks, 7, 3]
    slots = 40
    batch = np.zeros((3, slots, TRACK_VARS), np.float32)
    mask = np.ones((3, slots), bool)
    for i, n in enumerate(sizes):
        batch[i, :n] = pool[i * 40 : i * 40 + n]
        mask[i, :n] = False
    mean_j, inv_j = norm_arrays(run.norm_dict, "jets", "jets", names["jets"])
    mean_t, inv_t = norm_arrays(run.norm_dict, "tracks", "tracks", names["tracks"])
    inputs = {
        "jets": torch.from_numpy((jets - mean_j) * inv_j),
        "tracks": torch.from_numpy(np.where(mask[..., None], 0, (batch - mean_t) * inv_t)),
    }
    with torch.no_grad():
        outputs, _ = run.tagger(inputs, {"tracks": torch.from_numpy(mask)})
        probs = run.tagger.predict(outputs)
    got = run_jet(full_export.path.read_bytes(), jets[0], batch[0, :num_tracks])
    for i, cls in enumerate(("b", "c", "u", "tau")):
        assert got[f"GN2_p{cls}"].shape == ()
        assert abs(float(got[f"GN2_p{cls}"]) - float(probs["jet_classification"][0, i])) <= 1e-5
    assert got["GN2_TrackOrigin"].shape == got["GN2_VertexIndex"].shape == (num_tracks,)
    origin = probs["track_origin"][0, :num_tracks].argmax(-1).numpy()
    np.testing.assert_array_equal(got["GN2_TrackOrigin"], origin)
    if num_tracks:
        assert got["GN2_VertexIndex"][0] == 0 and got["GN2_VertexIndex"].max() < num_tracks


def test_onnx_matches_the_predictions_file(
    full_export, sample: Path, evaluated_run: EvaluatedRun
) -> None:
    """Jet by jet, driven by the metadata alone (what a downstream user does): the
    evaluation's probabilities, track origins and vertex groups of the same checkpoint."""
    model_bytes = full_export.path.read_bytes()
    meta = read_gnn_config(model_bytes, full_export.path)
    columns = meta["onnx_inputs"]
    with h5py.File(evaluated_run.result.predictions) as f:
        jets, tracks = f["jets"][:], f["tracks"][:]
    with h5py.File(sample / "test.h5") as f:
        jet_x = raw_features(f, "jets", columns["jet_features"], slice(None))
        track_x = raw_features(f, "tracks", columns["track_features"], slice(None))
        valid = f["tracks"]["valid"][:]
    for row in range(0, len(jets), 37):
        got = run_jet(model_bytes, jet_x[row], track_x[row][valid[row]])
        for cls in ("b", "c", "u", "tau"):
            assert abs(float(got[f"GN2_p{cls}"]) - jets[f"GN2_p{cls}"][row]) <= 1e-5
        real = tracks[row][valid[row]]
        np.testing.assert_array_equal(got["GN2_VertexIndex"], real["GN2_VertexIndex"])
        origin_fields = [n for n in tracks.dtype.names if n.startswith("GN2_p")]
        origin = np.stack([real[n].astype(np.float32) for n in origin_fields], -1)
        top = origin.max(-1)
        chosen = origin[np.arange(len(real)), got["GN2_TrackOrigin"].astype(int)]
        assert (top - chosen <= 2e-3).all()  # the file's origin probabilities are float16


# combinations of the matrix (tests/conftest.py) besides the trained run's GN2: GATv2, the
# cross-attention pooling, the global inputs concatenated after the encoder
ARCHITECTURES = [
    ("GN1", "gatv2", "global_attention"),
    ("GN2", "scaled_dot_product", "cross_attention"),
    ("GN2Cat", "scaled_dot_product", "global_attention"),
]
assert all(combo in MATRIX for combo in ARCHITECTURES)


@pytest.mark.parametrize("combo", ARCHITECTURES, ids=combo_id)
def test_other_architectures_export_with_parity(sample: Path, tmp_path: Path, combo) -> None:
    overrides = group_overrides(*combo)
    if combo[2] == "cross_attention":
        overrides.append("model.pooling.dense.hidden_layers=[16]")
    run_dir = make_run_dir(tmp_path, sample, *overrides)
    result = export(compose_export(run_dir, ALL_TASKS, "parity.num_jets=60"))
    assert not result.parity.failures()
    assert 0 < result.max_difference <= 1e-5
    model_bytes = result.path.read_bytes()
    schema = graph_schema(model_bytes)
    assert list(schema["inputs"]) == ["jet_features", "track_features"]
    meta = read_gnn_config(model_bytes, result.path)
    if "model=GN2Cat" in overrides:  # its global inputs are jet variables: one jet input
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["variables"]
        expected = list(dict.fromkeys([*cfg["jets"], *cfg["global"]]))
        assert meta["onnx_inputs"]["jet_features"] == expected
    if "model=GN1" in overrides:
        assert list(schema["outputs"])[:3] == ["GN1_pb", "GN1_pc", "GN1_pu"]


def test_several_object_types_export_as_athena_names_them(sample: Path, tmp_path: Path) -> None:
    """Tracks, flows and electrons: one input per type (flow_features [n_flows, 5] ...), the
    metadata's sequences named as the old tool names them, parity jet by jet."""
    flow_charge = {  # a task on the flows: its outputs per flow
        "type": "classification",
        "input": "flows",
        "label": "isCharged",
        "class_names": ["neutral", "charged"],
        "hidden_layers": [8],
        "context": True,
    }
    run_dir = make_run_dir(
        tmp_path,
        sample,
        "+model.variables.flows=[pt,energy,deta,dphi]",
        "+model.variables.electrons=[pt,ptfrac,dr,eProbabilityHT]",
        "model.embed_dim=32",
        "model.init_net.hidden_layers=[32]",
        "model.encoder.num_layers=1",
        tasks={"flow_charge": flow_charge},
    )
    tasks = "tasks=[jet_classification,track_origin,track_vertexing,flow_charge]"
    result = export(compose_export(run_dir, tasks, "parity.num_jets=80"))
    assert not result.parity.failures() and result.max_difference <= 1e-5
    model_bytes = result.path.read_bytes()
    schema = graph_schema(model_bytes)["inputs"]
    assert schema == {
        "jet_features": {"dtype": "float32", "shape": [1, 2]},
        "track_features": {"dtype": "float32", "shape": ["n_tracks", TRACK_VARS]},
        "flow_features": {"dtype": "float32", "shape": ["n_flows", 4]},
        "electron_features": {"dtype": "float32", "shape": ["n_electrons", 4]},
    }
    meta = read_gnn_config(model_bytes, result.path)
    names = [s["name"] for s in meta["input_sequences"]]
    assert names == [
        "tracks_r22default_sd0sort",
        "flows_r22default_sd0sort",
        "electrons_r22default",
    ]
    assert graph_schema(model_bytes)["outputs"]["GN2_FlowCharge"] == {
        "dtype": "int8",
        "shape": ["n_flows"],
    }
    assert result.parity.outputs["GN2_FlowCharge"].values > 1000  # one per flow, all equal
    # a jet without electrons and one with: both run
    with h5py.File(sample / "test.h5") as f:
        has = f["electrons"]["valid"][:200].any(1)
        flows_valid = f["flows"]["valid"][:100]
    assert has.any() and (~has).any()
    # the predictions file gets a `flows` dataset in the file's slot layout
    evaluated = evaluate(compose_evaluate(run_dir, "write_tracks=true", "data.num_test=100"))
    with h5py.File(evaluated.predictions) as f:
        flows = f["flows"][:]
    assert flows.shape == flows_valid.shape
    total = flows["GN2_pneutral"].astype(np.float32) + flows["GN2_pcharged"]
    np.testing.assert_allclose(total[flows_valid], 1.0, atol=2e-3)  # float16
    assert (total[~flows_valid] == 0).all() and np.array_equal(flows["valid"], flows_valid)


# ---- export options -------------------------------------------------------------------------
def test_name_combination_rename_and_track_selection(gn2: Path, sample: Path) -> None:
    cfg = compose_export(
        gn2,
        "name=GN2v01",
        "track_selection=r22loose",
        "combine_outputs=['plight,pu,0.5*ptau']",
        "rename_outputs=['pc:pcharm']",
        "parity.num_jets=100",
        f"output={gn2 / 'options.onnx'}",
    )
    result = export(cfg)
    model_bytes = result.path.read_bytes()
    outputs = list(graph_schema(model_bytes)["outputs"])
    assert outputs == ["GN2v01_pb", "GN2v01_pcharm", "GN2v01_pu", "GN2v01_ptau", "GN2v01_plight"]
    meta = read_gnn_config(model_bytes, result.path)
    assert meta["input_sequences"][0]["name"] == "tracks_r22loose_sd0sort"
    assert meta["combine_outputs"] == [["plight", [[1.0, "pu"], [0.5, "ptau"]]]]
    assert meta["rename_outputs"] == {"pc": "pcharm"}
    with h5py.File(sample / "test.h5") as f:
        jet = raw_features(f, "jets", meta["onnx_inputs"]["jet_features"], slice(5, 6))[0]
        tracks = raw_features(f, "tracks", meta["onnx_inputs"]["track_features"], slice(5, 6))
        tracks = tracks[0][f["tracks"]["valid"][5]]
    got = run_jet(model_bytes, jet, tracks)
    assert got["GN2v01_plight"] == pytest.approx(got["GN2v01_pu"] + 0.5 * got["GN2v01_ptau"])
    assert result.parity.outputs["GN2v01_plight"].max_difference <= 1e-5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("name=GN2_v01", r"name='GN2_v01': a model name in the outputs .* has no '_' or '-'"),
        ("tasks=[jet_flavour]", r"tasks: the model has no task 'jet_flavour'; it has \["),
        ("track_selection=r21", r"track_selection=r21: Athena knows all, ip3d, .*r22default"),
        ("combine_outputs=[plight]", r"combine_outputs: 'plight' is not <new name>,<term>"),
        ("combine_outputs=['plight,pl']", r"'plight' sums 'pl', not an output; the jet outputs"),
        ("rename_outputs=[pu]", r"rename_outputs: 'pu' is not <old>:<new>"),
        ("rename_outputs=['px:py']", r"rename_outputs: no output 'px' to rename"),
    ],
)
def test_option_errors_name_the_key(gn2: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        export(compose_export(gn2, override, f"output={gn2 / 'bad.onnx'}"))
    assert not (gn2 / "bad.onnx").exists()


# ---- salt.onnx_info and salt.onnx_compare ---------------------------------------------------
def test_onnx_info_prints_schema_and_metadata(
    full_export, capsys: pytest.CaptureFixture[str]
) -> None:
    from salt.onnx_info import main

    main([str(full_export.path)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{full_export.path}: model GN2 (v1), salt ")
    assert "  jet_features     float32  [1, 2]           jet_var: pt, eta" in out
    assert "  track_features   float32  [n_tracks, 19]   tracks_r22default_sd0sort: d0, " in out
    assert "  GN2_VertexIndex  int8     [n_tracks]" in out
    assert "  tracks.d0: mean " in out
    main([str(full_export.path), "--json"])
    assert json.loads(capsys.readouterr().out)["model_name"] == "GN2"
    with pytest.raises(SystemExit) as stop:
        main([str(full_export.path.with_name("missing.onnx"))])
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"salt: error: {full_export.path.with_name('missing.onnx')}: no such file "
        "(expected an exported .onnx model)"
    )


def test_onnx_compare_reports_each_output_and_a_wrong_checkpoint(
    full_export, gn2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from salt.onnx_compare import main

    main([str(full_export.path), "--num-jets", "200"])
    out = capsys.readouterr().out
    assert "on 200 jets of" in out and "GN2_TrackOrigin  0 of " in out
    assert out.strip().endswith("within 1e-05")
    # the other epoch's checkpoint: same model, other weights
    best = ckpt.best_checkpoint(gn2 / "ckpts")
    other = next(p for p in sorted((gn2 / "ckpts").glob("epoch=*.ckpt")) if p != best)
    with pytest.raises(SystemExit) as stop:
        main([str(full_export.path), "--num-jets", "50", "--ckpt", str(other)])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"salt: error: {full_export.path} differs from {other} above")


# ---- errors ---------------------------------------------------------------------------------
def test_errors_leave_no_file(gn2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = gn2 / "strict.onnx"
    with pytest.raises(ExportError, match=r"parity check failed for GN2_pb.*max \|onnxruntime"):
        export(compose_export(gn2, f"output={out}", "parity.tolerance=1e-12"))
    assert not out.exists()
    out.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"strict\.onnx exists; pass overwrite=true"):
        export(compose_export(gn2, f"output={out}"))
    assert out.read_bytes() == b"x"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ExportError, match="pip install onnx onnxruntime"):
        export(compose_export(gn2, f"output={gn2 / 'other.onnx'}"))


# ---- a full or read-only disk ---------------------------------------------------------------
def test_full_disk_keeps_the_earlier_model(
    trained_run: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        run_dir = copy_run(trained_run.run_dir, disk)
        first = export(compose_export(run_dir, "parity.num_jets=50")).path
        earlier = first.read_bytes()
        before = sorted(run_dir.rglob("*"))
        filler = fill_disk(disk, leave=len(earlier) // 4)
        cfg = compose_export(run_dir, "parity.num_jets=50", "overwrite=true")
        err = entry_point_error(export, cfg, capsys).strip()
        assert err.startswith(f"salt: error: could not write {first}: No space left on device; ")
        assert err.endswith(
            f" MiB free in {first.parent}; nothing was written (earlier results unchanged). "
            "Free space (or raise the quota) and run the same command again."
        )
        assert first.read_bytes() == earlier
        assert sorted(run_dir.rglob("*")) == before  # no partial file
        filler.unlink()
        assert export(cfg).path == first  # the same command, once there is space


def test_read_only_output_directory_is_one_line_before_any_work(
    gn2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with read_only_view(gn2 / "ckpts", tmp_path / "ro") as ro:
        out = ro / "sub" / "model.onnx"
        err = entry_point_error(export, compose_export(gn2, f"output={out}"), capsys)
        assert err.strip() == (
            f"salt: error: could not write {out}: Read-only file system; salt needs write "
            f"permission in {ro} (on a writable file system); nothing was written (earlier "
            "results unchanged). Make it writable, or pass output=<path in a writable directory>."
        )
        assert "parity" not in capsys.readouterr().out  # refused before the model was built
