"""ONNX export: named inputs and outputs, metadata, parity with torch and with the evaluation's
predictions file, and the errors. GN2: a copy of the session's trained run (tests/conftest.py);
the other architectures: run directories built without training (seeded weights), parity does
not need a good model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from salt.errors import ConfigError
from salt.evaluation.onnx_model import ExportError, raw_features, session
from salt.export import export
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
from tests.test_evaluate import make_run_dir

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def read_metadata(model_bytes: bytes) -> dict[str, str]:
    """The metadata_props of a serialised ONNX model."""
    return {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props}


def compose_export(run_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("export", overrides=[f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def gn2(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained run (exports write into its ckpts directory)."""
    return copy_run(trained_run.run_dir, tmp_path_factory.mktemp("gn2"))


def run_onnx(model: Path, test_file: Path, rows: slice) -> dict[str, np.ndarray]:
    """The exported model on raw features read straight from the file, driven by its
    metadata alone (what a downstream user would do)."""
    meta = read_metadata(model.read_bytes())
    inputs = json.loads(meta["inputs"])
    feed = {}
    with h5py.File(test_file) as f:
        for name, spec in inputs.items():
            if name == "track_mask":
                feed[name] = ~f[spec.get("dataset", "tracks")].fields("valid")[rows]
            else:
                feed[name] = raw_features(f, spec["dataset"], spec["variables"], rows)
    sess = session(model.read_bytes())
    names = json.loads(meta["outputs"])
    return dict(zip(names, sess.run(names, feed), strict=True))


def test_export_inputs_outputs_metadata_and_parity(gn2: Path, sample: Path) -> None:
    result = export(compose_export(gn2))
    best = ckpt.best_checkpoint(gn2 / "ckpts")
    assert best is not None and result.path == best.with_suffix(".onnx")
    assert 0.0 < result.max_difference <= 1e-4
    assert result.parity_file == sample / "test.h5" and result.parity_jets == 750
    sess = session(result.path.read_bytes())
    inputs = {i.name: i for i in sess.get_inputs()}
    assert list(inputs) == ["jet_features", "track_features", "track_mask"]
    assert inputs["jet_features"].shape == ["batch", 2]
    assert inputs["track_features"].shape == ["batch", "tracks", 19]
    assert inputs["track_mask"].type == "tensor(bool)"
    outputs = [o.name for o in sess.get_outputs()]
    assert outputs == [
        "GN2_pb",
        "GN2_pc",
        "GN2_pu",
        "GN2_ptau",
        "GN2_track_origin",
        "GN2_track_vertexing",
    ]
    meta = read_metadata(result.path.read_bytes())
    assert meta["model_name"] == "GN2" and json.loads(meta["outputs"]) == outputs
    config = yaml.safe_load((gn2 / "config.yaml").read_text())
    variables = json.loads(meta["variables"])
    assert variables == {k: config["model"]["variables"][k] for k in ("jets", "tracks")}
    norm = yaml.safe_load((sample / "norm_dict.yaml").read_text())
    saved = json.loads(meta["norm_dict"])
    for input_type in ("jets", "tracks"):
        for var in variables[input_type]:
            assert saved[input_type][var] == norm[input_type][var]


def test_onnx_matches_the_predictions_file(
    gn2: Path, sample: Path, evaluated_run: EvaluatedRun
) -> None:
    """The ONNX model on raw inputs gives the evaluation's probabilities (the session's
    evaluation of the same checkpoint), row for row, also for a batch cut to few track slots
    (the dynamic axis)."""
    model = export(compose_export(gn2, "output=" + str(gn2 / "model.onnx"))).path
    predictions = evaluated_run.result.predictions
    assert predictions.name.startswith(ckpt.best_checkpoint(gn2 / "ckpts").stem + "__")
    with h5py.File(predictions) as f:
        jets = f["jets"][:]
    out = run_onnx(model, sample / "test.h5", slice(0, len(jets)))
    for cls in ("b", "c", "u", "tau"):
        np.testing.assert_allclose(out[f"GN2_p{cls}"], jets[f"GN2_p{cls}"], atol=1e-5)
    total = sum(out[f"GN2_p{c}"] for c in ("b", "c", "u", "tau"))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    # jets with at most 3 tracks, fed with 3 slots only
    with h5py.File(sample / "test.h5") as f:
        few = np.flatnonzero(f["jets"]["n_tracks"] <= 3)[:5]
        assert len(few) > 0
        meta = read_metadata(model.read_bytes())
        names = json.loads(meta["variables"])
        feed = {
            "jet_features": raw_features(f, "jets", names["jets"], slice(None))[few],
            "track_features": raw_features(f, "tracks", names["tracks"], slice(None))[few, :3],
            "track_mask": ~f["tracks"].fields("valid")[:][few, :3],
        }
    got = session(model.read_bytes()).run(["GN2_pb"], feed)[0]
    np.testing.assert_allclose(got, jets["GN2_pb"][few], atol=1e-5)


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
    result = export(compose_export(run_dir, "parity.num_jets=60", "parity.batch_size=25"))
    assert result.max_difference <= 1e-4
    sess = session(result.path.read_bytes())
    names = [i.name for i in sess.get_inputs()]
    if "model=GN2Cat" in overrides:
        assert names[-1] == "global_features"
    if "model=GN1" in overrides:
        assert [o.name for o in sess.get_outputs()][:3] == ["GN1_pb", "GN1_pc", "GN1_pu"]


def test_errors_leave_no_file(gn2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = gn2 / "strict.onnx"
    with pytest.raises(ExportError, match=r"parity check failed: largest difference .* exceeds"):
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
        before = sorted((run_dir / "ckpts").iterdir())
        filler = fill_disk(disk, leave=len(earlier) // 4)
        cfg = compose_export(run_dir, "parity.num_jets=50", "overwrite=true")
        err = entry_point_error(export, cfg, capsys).strip()
        assert err.startswith(f"salt: error: could not write {first}: No space left on device; ")
        assert err.endswith(
            f" MiB free in {first.parent}; nothing was written (earlier results unchanged). "
            "Free space (or raise the quota) and run the same command again."
        )
        assert first.read_bytes() == earlier
        assert sorted((run_dir / "ckpts").iterdir()) == before  # no partial file
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
        # the default output, beside the checkpoint in the read-only directory
        best = ckpt.best_checkpoint(gn2 / "ckpts")
        assert best is not None
        ckpt_path = ro / best.name
        cfg = compose_export(gn2, f"ckpt_path='{ckpt_path}'", "overwrite=true")
        err = entry_point_error(export, cfg, capsys)
        assert err.startswith(f"salt: error: could not write {ckpt_path.with_suffix('.onnx')}: ")
