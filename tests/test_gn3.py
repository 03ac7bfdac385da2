"""GN3 end to end on the built-in sample: three object types, its encoder options and extra
tasks train (the loss falls), evaluate and export with the old tool's per-type inputs."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
from hydra import compose, initialize_config_dir

from salt.evaluate import evaluate
from salt.export import export
from salt.onnx.model import graph_schema
from salt.train import train
from tests.conftest import CONF, TrainedRun

# GN3 shrunk as the session's GN2 (tests/conftest.py TRAINED_RUN); its own options kept
SHRUNK = [
    "model=GN3",
    "model.embed_dim=32",
    "model.init_net.hidden_layers=[32]",
    "model.encoder.num_layers=2",
    "model.encoder.out_dim=16",
    "model.encoder.num_registers=2",
    "model.attention.num_heads=2",
    *[
        f"model.tasks.{t}.hidden_layers=[16]"
        for t in ("jet_classification", "track_origin", "track_vertexing", "track_type")
    ],
    "model.tasks.jet_charge.hidden_layers=[16]",
    "model.tasks.jet_pt_regression.hidden_layers=[16]",
    "trainer.max_epochs=3",
    "optimizer.max=2e-3",
]


@pytest.mark.slow  # trains 3 short epochs
def test_gn3_trains_evaluates_and_exports(trained_run: TrainedRun, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    overrides = [*trained_run.overrides, *SHRUNK, f"log_dir={logs}"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=overrides)
    train(cfg)
    (run_dir,) = logs.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    for task in ("track_type", "jet_charge", "jet_pt_regression"):  # GN3's own tasks
        assert any(f"val/{task}_loss" in r for r in rows), task

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("evaluate", overrides=[f"run_dir={run_dir}", "progress_bar=false"])
    result = evaluate(cfg)
    with h5py.File(result.predictions) as f:
        names = f["jets"].dtype.names
    assert {"GN3_pb", "GN3_jet_charge_pbquark", "GN3_ptFromTruthDressedWZJet"} <= set(names)

    tasks = "[jet_classification,jet_charge,jet_pt_regression,track_origin,track_vertexing,"
    tasks += "track_type]"
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("export", overrides=[f"run_dir={run_dir}", f"tasks={tasks}"])
    exported = export(cfg)
    assert not exported.parity.failures()
    schema = graph_schema(exported.path.read_bytes())
    assert list(schema["inputs"]) == [
        "jet_features",
        "track_features",
        "flow_features",
        "electron_features",
    ]
    assert schema["outputs"]["GN3_TrackType"] == {"dtype": "int8", "shape": ["n_tracks"]}
    assert schema["outputs"]["GN3_ptFromTruthDressedWZJet"] == {"dtype": "float32", "shape": []}
