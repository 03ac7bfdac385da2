"""Evaluation: the predictions file (layout, row order, tracks, copied variables, precision), the
b-tagging performance (atlas-ftag-tools' numbers), the entry point's choices and errors. On the
session's trained run (a tiny GN2 trained once on the
built-in sample, tests/conftest.py), copied: evaluations write into their run directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from ftag import Flavours
from ftag.hdf5 import H5Reader
from ftag.utils.metrics import calculate_rejection, get_discriminant
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from salt.data.ftag import DataError
from salt.data.labels import LabelSpec, class_indices
from salt.data.sample import write_sample
from salt.errors import ConfigError
from salt.evaluate import evaluate
from salt.evaluation.performance import (
    b_tagging_performance,
    discriminant,
    flavour_of,
    rejections,
)
from salt.evaluation.predictions import (
    JetScores,
    class_field,
    predictions_path,
    sample_name,
)
from salt.evaluation.run import load_run
from salt.models import build_tagger
from salt.models.tagger import ModelConfig
from salt.models.tasks import TaskConfig
from salt.onnx.model import OnnxTagger
from salt.onnx.parity import raw_features
from salt.training import checkpoint as ckpt
from salt.training.run_dir import config_to_save
from tests.conftest import (
    EvaluatedRun,
    TrainedRun,
    copy_run,
    entry_point_error,
    fill_disk,
    read_only_view,
    small_tmpfs,
)
from tests.test_train import env

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TASKS = ("jet_classification", "track_origin", "track_vertexing")
TINY = [
    "force=true",
    "logger=none",
    "trainer.progress_bar=false",
    "data.batch_size=100",
    "data.num_workers=0",
    "model.embed_dim=32",
    "model.init_net.hidden_layers=[32]",
    "model.encoder.num_layers=1",
    "model.encoder.out_dim=32",
    "model.attention.num_heads=2",
    *[f"model.tasks.{t}.hidden_layers=[32]" for t in TASKS],
]
JET_FIELDS = [
    "pt_btagJes",
    "eta_btagJes",
    "HadronConeExclTruthLabelID",
    "flavour_label",
    "n_tracks",
    "ptFromTruthDressedWZJet",
    "HadronGhostInitialTruthLabelPdgId",
]


def compose_train(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=[*TINY, *overrides])


def compose_evaluate(run_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(
            "evaluate", overrides=[f"run_dir={run_dir}", "progress_bar=false", *overrides]
        )


def make_run_dir(
    tmp: Path,
    sample: Path,
    *overrides: str,
    tasks: dict[str, dict] | None = None,
    model: dict | None = None,
) -> Path:
    """A run directory without training: the composed config (``tasks`` added to the model's:
    a command line cannot add one; ``model`` merged into the model node, e.g. model.edges
    whole), the sample's dicts and a checkpoint of a freshly
    initialised tagger (seeded)."""
    files = [f"data.{split}_file={sample / f'{split}.h5'}" for split in ("train", "val", "test")]
    cfg = compose_train(*files, *overrides)
    if model:
        with open_dict(cfg):
            cfg.model = OmegaConf.merge(cfg.model, model)
    with open_dict(cfg.model.tasks):
        for name, task in (tasks or {}).items():
            cfg.model.tasks[name] = OmegaConf.merge(OmegaConf.structured(TaskConfig), task)
    torch.manual_seed(0)
    tagger = build_tagger(cfg.model, loss_weights=False)
    run_dir = tmp / f"{cfg.model.name}_run"
    (run_dir / "ckpts").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config_to_save(cfg)), run_dir / "config.yaml")
    for name in ("norm_dict.yaml", "class_dict.yaml"):
        (run_dir / name).write_bytes((sample / name).read_bytes())
    state = {
        "model": tagger.state_dict(),
        "config": ModelConfig.read(cfg.model).plain(),
    }
    ckpt.save_checkpoint(state, run_dir / "ckpts" / ckpt.checkpoint_name(0, 1.0))
    return run_dir


@pytest.fixture(scope="session")
def trained(evaluated_run: EvaluatedRun, trained_run: TrainedRun) -> tuple[Path, Path]:
    """(run dir, test file): a copy of the session's trained run (GN2 shrunk, 2 epochs on 3000
    jets of the built-in sample), which the evaluations write into."""
    return evaluated_run.run_dir, trained_run.test_file


@pytest.fixture(scope="session")
def evaluated(evaluated_run: EvaluatedRun):
    """The default evaluation of the trained run, with track outputs."""
    return evaluated_run.result


def test_predictions_file_layout_and_row_order(trained, evaluated) -> None:
    run_dir, test_file = trained
    best = ckpt.best_checkpoint(run_dir / "ckpts")
    assert best is not None and best.name.startswith("epoch=001")  # loss fell in epoch 1
    assert evaluated.predictions == run_dir / "ckpts" / f"{best.stem}__test_test.h5"
    with h5py.File(test_file) as src, h5py.File(evaluated.predictions) as out:
        jets, truth = out["jets"][:], src["jets"][:]
        probs = ["GN2_pb", "GN2_pc", "GN2_pu", "GN2_ptau"]
        # probabilities, the task's truth label, then the other extra variables
        assert list(jets.dtype.names) == [
            *probs,
            "flavour_label",
            *JET_FIELDS[:2],
            *JET_FIELDS[2:3],
            "n_tracks",
            *JET_FIELDS[5:],
        ]
        assert all(jets.dtype[p] == np.float32 for p in probs)
        assert len(jets) == len(truth) == evaluated.num_jets == 750
        for name in JET_FIELDS:  # copied unchanged, row for row
            np.testing.assert_array_equal(jets[name], truth[name])
        assert list(out["jets"].attrs["flavour_label"]) == list(src["jets"].attrs["flavour_label"])
        assert out.attrs["checkpoint"] == str(best)


def test_each_row_holds_its_own_jets_prediction(trained, evaluated) -> None:
    """Rows far apart, recomputed jet by jet from the raw file with the model (its ONNX
    wrapper, in torch): the right jet in each row."""
    run_dir, test_file = trained
    run = load_run(run_dir)
    wrapper = OnnxTagger(run)
    rows = slice(437, 449)
    with h5py.File(test_file) as f:
        jets = raw_features(f, "jets", wrapper.jet_columns, rows)
        tracks = raw_features(f, "tracks", wrapper.variables["tracks"], rows)
        valid = f["tracks"].fields("valid")[rows]
    with h5py.File(evaluated.predictions) as out:
        predicted = out["jets"][rows]
    with torch.no_grad():
        for i in range(len(jets)):
            expected = wrapper(
                torch.from_numpy(jets[i : i + 1]), torch.from_numpy(tracks[i][valid[i]])
            )
            for j, cls in enumerate(["b", "c", "u", "tau"]):
                assert abs(predicted[f"GN2_p{cls}"][i] - float(expected[j])) <= 1e-5


def test_probabilities_sum_to_one(evaluated) -> None:
    with h5py.File(evaluated.predictions) as out:
        jets, tracks = out["jets"][:], out["tracks"][:]
    total = sum(jets[f"GN2_p{c}"].astype(np.float64) for c in ["b", "c", "u", "tau"])
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    origin = [n for n in tracks.dtype.names if n.startswith("GN2_p")]
    assert len(origin) == 8 and tracks.dtype[origin[0]] == np.float16
    valid = tracks["valid"]
    track_total = sum(tracks[n].astype(np.float64) for n in origin)
    np.testing.assert_allclose(track_total[valid], 1.0, atol=5e-3)  # float16
    assert (track_total[~valid] == 0).all()


def test_track_outputs_align_with_the_input_slots(trained, evaluated) -> None:
    _, test_file = trained
    with h5py.File(test_file) as src, h5py.File(evaluated.predictions) as out:
        tracks, truth = out["tracks"][:], src["tracks"][:]
    assert tracks.shape == truth.shape == (750, 40)
    for name in ("ftagTruthOriginLabel", "ftagTruthVertexIndex", "valid"):
        np.testing.assert_array_equal(tracks[name], truth[name])
    vertex = tracks["GN2_VertexIndex"]
    assert (vertex[~truth["valid"]] == -1).all() and (vertex[truth["valid"]] >= 0).all()
    # groups are numbered 0, 1, ... in order of their first track
    for row in vertex[:50]:
        firsts = [int(v) for i, v in enumerate(row) if v >= 0 and v not in row[:i]]
        assert firsts == list(range(len(firsts)))


@pytest.mark.slow  # a physics floor of a trained tagger
def test_light_rejection_well_above_a_random_taggers(evaluated) -> None:
    perf = evaluated.performance
    assert perf is not None
    # a random tagger rejects 1 / 0.7 = 1.43 of the light jets at 70% b-efficiency
    assert perf.working_points[70]["light_rejection"] > 2.5
    assert perf.working_points[70]["c_rejection"] > 1.2
    saved = yaml.safe_load(evaluated.performance_file.read_text())
    assert saved["f_c"] == 0.2 and set(saved["working_points"]) == {60, 70, 77, 85}
    assert saved["num_jets"] == perf.counts
    assert evaluated.roc_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


PROBS = ["GN2_pb", "GN2_pc", "GN2_pu", "GN2_ptau"]
FLAVOURS = {"light": "ujets", "c": "cjets", "tau": "taujets"}  # salt's result names


def ftag_numbers(
    path: Path, f_c: float = 0.2, f_tau: float = 0.0, wps: tuple[float, ...] = (60, 70, 77, 85)
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """(rejections per background, cuts, discriminant per flavour) as a puma user computes
    them from the predictions file alone: ftag's reader, discriminant, flavour cuts and
    rejection."""
    jets = H5Reader(path, batch_size=100, shuffle=False).load({"jets": None})["jets"]
    fractions = {"fc": f_c, "fu": round(1 - f_c - f_tau, 12), "ftau": f_tau}
    single = Flavours.by_category("single-btag")
    disc = get_discriminant(jets, "GN2", Flavours["bjets"], single, fractions)
    per = {name: disc[Flavours[f].cuts(jets).idx] for name, f in {"b": "bjets", **FLAVOURS}.items()}
    effs = np.array(wps) / 100
    rej, cuts = {}, None
    for name in FLAVOURS:
        with np.errstate(over="ignore"):  # float16 scores: see salt.evaluation.performance
            rej[name], cuts = calculate_rejection(per["b"], per[name], effs, return_cuts=True)
    assert cuts is not None
    return rej, cuts, per


def test_performance_is_ftags_on_the_written_file(evaluated) -> None:
    """The rejections and cuts printed and saved are what atlas-ftag-tools computes from the
    predictions file (what puma shows); the uncertainties are binomial."""
    rej, cuts, per = ftag_numbers(evaluated.predictions)
    perf = evaluated.performance
    saved = yaml.safe_load(evaluated.performance_file.read_text())
    assert saved["fraction_values"] == {"fc": 0.2, "fu": 0.8, "ftau": 0.0}
    assert saved["computed_with"].startswith("atlas-ftag-tools")
    assert saved["num_jets"] == {name: len(d) for name, d in per.items()}
    for i, wp in enumerate((60, 70, 77, 85)):
        row = perf.working_points[wp]
        assert row == saved["working_points"][wp]
        assert row["cut"] == cuts[i]
        for name in FLAVOURS:
            assert row[f"{name}_rejection"] == rej[name][i]
            # binomial, by hand: k of the N jets of the flavour pass the cut
            background = per[name]
            k, n = int((background >= cuts[i]).sum()), len(background)
            err = row[f"{name}_rejection_err"]
            if k == 0:
                assert row[f"{name}_rejection"] == np.inf and err is None
                continue
            eff = k / n
            assert row[f"{name}_rejection"] == pytest.approx(1 / eff, rel=1e-12)
            assert err == pytest.approx(np.sqrt(eff * (1 - eff) / n) / eff**2, rel=1e-9)
    assert evaluated.disc_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictions_read_with_the_plotting_stacks_reader(trained, evaluated) -> None:
    """atlas-ftag-tools' H5Reader (what puma's users load with) reads the file written by h5py
    as plain h5py does, in the test file's row order."""
    _, test_file = trained
    read = H5Reader(evaluated.predictions, batch_size=100, shuffle=False).load(
        {"jets": None, "tracks": None}
    )
    with h5py.File(evaluated.predictions) as out, h5py.File(test_file) as src:
        assert out["jets"].compression == "lzf"  # built into h5py: no hdf5plugin needed
        np.testing.assert_array_equal(read["jets"], out["jets"][:])
        np.testing.assert_array_equal(read["tracks"], out["tracks"][:])
        np.testing.assert_array_equal(read["jets"]["pt_btagJes"], src["jets"]["pt_btagJes"])


def test_refuses_to_overwrite_then_overwrites(trained, evaluated) -> None:
    run_dir, _ = trained
    before = evaluated.predictions.stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"__test_test\.h5 exists; pass overwrite=true"):
        evaluate(compose_evaluate(run_dir))
    assert evaluated.predictions.stat().st_mtime_ns == before
    first = evaluate(compose_evaluate(run_dir, "data.test_suffix=ow", "data.num_test=120"))
    with pytest.raises(ConfigError, match=r"__test_test_ow\.h5 exists"):
        evaluate(compose_evaluate(run_dir, "data.test_suffix=ow", "data.num_test=60"))
    again = evaluate(
        compose_evaluate(run_dir, "data.test_suffix=ow", "data.num_test=60", "overwrite=true")
    )
    assert again.predictions == first.predictions
    with h5py.File(again.predictions) as out:
        assert "tracks" not in out and len(out["jets"]) == 60
    assert not [p for p in (run_dir / "ckpts").iterdir() if p.name.startswith(".")]


def test_num_test_suffix_ckpt_path_and_batch_size(trained, evaluated) -> None:
    run_dir, _ = trained
    result = evaluate(
        compose_evaluate(
            run_dir,
            f"ckpt_path={run_dir / 'ckpts' / 'last.ckpt'}",
            "data.num_test=250",
            "data.test_suffix=small",
            "data.batch_size=64",
        )
    )
    assert result.predictions == run_dir / "ckpts" / "last__test_test_small.h5"
    assert result.performance_file.name == "last__test_test_small__performance.yaml"
    # last.ckpt is a copy of the final epoch's (the best) checkpoint: same predictions
    with h5py.File(result.predictions) as a, h5py.File(evaluated.predictions) as b:
        small, full = a["jets"][:], b["jets"][:250]
    assert len(small) == 250
    np.testing.assert_allclose(small["GN2_pb"], full["GN2_pb"], atol=1e-5)


def test_gn1_three_classes_and_raw_truth(tmp_path: Path) -> None:
    """GN1 maps HadronConeExclTruthLabelID; tau jets (15, not in its map) still get
    predictions, keep their raw label and are left out of the performance."""
    sample = tmp_path / "sample"
    write_sample(sample, 400, seed=3)
    run_dir = make_run_dir(tmp_path, sample, "model=GN1")
    result = evaluate(compose_evaluate(run_dir, f"data.test_file={sample / 'test.h5'}"))
    with h5py.File(result.predictions) as out, h5py.File(sample / "test.h5") as src:
        jets, labels = out["jets"][:], src["jets"]["HadronConeExclTruthLabelID"]
    assert [n for n in jets.dtype.names if n.startswith("GN1_")] == ["GN1_pb", "GN1_pc", "GN1_pu"]
    np.testing.assert_array_equal(jets["HadronConeExclTruthLabelID"], labels)
    assert (labels == 15).any()
    assert result.performance is not None
    assert result.performance.counts == {
        "b": int((labels == 5).sum()),
        "light": int((labels == 0).sum()),
        "c": int((labels == 4).sum()),
    }
    assert "tau_rejection" not in result.performance.working_points[60]
    # a tau fraction without a tau class: refused before the model predicts anything
    test_file = f"data.test_file={sample / 'test.h5'}"
    cfg = compose_evaluate(run_dir, test_file, "f_tau=0.1", "data.test_suffix=tau")
    with pytest.raises(ConfigError, match=r"f_tau=0\.1: the model's jet classes \['b', 'c', 'u'\]"):
        evaluate(cfg)
    assert not list((run_dir / "ckpts").glob("*_tau*"))


def test_user_errors(trained, tmp_path: Path) -> None:
    run_dir, _ = trained
    with pytest.raises(DataError, match=r"no variable 'n_trakcs' \(extra_jet_vars\).*n_tracks"):
        evaluate(compose_evaluate(run_dir, "extra_jet_vars=[n_trakcs]", "data.test_suffix=x"))
    with pytest.raises(ConfigError, match="run_dir is required"):
        evaluate(compose_evaluate(run_dir, "run_dir=null"))
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_path=.*not found"):
        evaluate(compose_evaluate(run_dir, f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    with pytest.raises(ConfigError, match=r"f_c=1\.5"):
        evaluate(compose_evaluate(run_dir, "f_c=1.5"))
    with pytest.raises(ConfigError, match=r"f_c=0\.5, f_tau=0\.6: .* more than 1"):
        evaluate(compose_evaluate(run_dir, "f_c=0.5", "f_tau=0.6"))
    # OmegaConf reads [1] as ['1']: a number is no variable name
    with pytest.raises(ConfigError, match=r"extra_track_vars: '1' is not a variable name"):
        evaluate(compose_evaluate(run_dir, "extra_track_vars=[1]"))
    with pytest.raises(DataError, match="file not found"):
        evaluate(compose_evaluate(run_dir, f"data.test_file={tmp_path / 'missing.h5'}"))
    assert not list((run_dir / "ckpts").glob("*__test_test_x*"))


def test_entry_point_reports_user_errors_in_one_line(
    trained, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m salt.evaluate` runs `evaluate` through `run_entry_point` (the command line's
    one-line format itself: test_bad_inputs.test_cli_error_is_one_line_without_traceback)."""
    run_dir, _ = trained
    cfg = compose_evaluate(run_dir, "extra_jet_vars=[nope]", "data.test_suffix=cli")
    with pytest.raises(DataError, match=r"no variable 'nope' \(extra_jet_vars\)"):
        evaluate(cfg)
    err = entry_point_error(evaluate, cfg, capsys)
    assert err.strip().splitlines() == [f"salt: error: {err.strip().removeprefix('salt: error: ')}"]
    assert "'nope'" in err


# ---- what the predictions file holds: variables, precision, names ------------------------
@pytest.fixture(scope="module")
def wide_test_file(tmp_path_factory: pytest.TempPathFactory, trained_run: TrainedRun) -> Path:
    """The session's test file with more jet variables than the sample has: a float64 event
    weight, an int8 flag and ``GN2_pb``, another training's score named like this run's."""
    path = tmp_path_factory.mktemp("wide") / "pp_output_test_wide.h5"
    with h5py.File(trained_run.test_file) as src, h5py.File(path, "w") as dst:
        jets = src["jets"][:]
        extra = [("mcEventWeight", "f8"), ("GN2_pb", "f4"), ("isolated", "i1")]
        wide = np.zeros(len(jets), dtype=[*jets.dtype.descr, *extra])
        for name in jets.dtype.names:
            wide[name] = jets[name]
        rng = np.random.default_rng(5)
        wide["mcEventWeight"] = rng.normal(1.0, 0.1, len(jets))
        wide["GN2_pb"] = -1.0
        wide["isolated"] = rng.integers(0, 2, len(jets))
        dst.create_dataset("jets", data=wide)
        dst["jets"].attrs.update(dict(src["jets"].attrs))
        dst.create_dataset("tracks", data=src["tracks"][:])
    return path


def test_every_jet_variable_by_default_and_a_list_narrows_it(
    trained, wide_test_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir, _ = trained
    args = (f"data.test_file={wide_test_file}", "data.num_test=200")
    with h5py.File(wide_test_file) as f:
        src = f["jets"][:200]
    with caplog.at_level("WARNING", logger="salt"):
        result = evaluate(compose_evaluate(run_dir, *args))
    jets = jets_of(result.predictions)
    # the truth label first, then the file's variables in its order, types kept; the file's
    # GN2_pb is not copied over this run's prediction
    assert list(jets.dtype.names) == [
        *PROBS,
        "flavour_label",
        "pt_btagJes",
        "eta_btagJes",
        "HadronConeExclTruthLabelID",
        "n_tracks",
        "ptFromTruthDressedWZJet",
        "HadronGhostInitialTruthLabelPdgId",
        "mcEventWeight",
        "isolated",
    ]
    for name in jets.dtype.names[len(PROBS) :]:
        assert jets.dtype[name] == src.dtype[name]
        np.testing.assert_array_equal(jets[name], src[name])
    assert (jets["GN2_pb"] >= 0).all()
    assert "GN2_pb" in caplog.text
    narrow = evaluate(
        compose_evaluate(run_dir, *args, "extra_jet_vars=[mcEventWeight]", "data.test_suffix=n")
    )
    jets = jets_of(narrow.predictions)
    assert list(jets.dtype.names) == [*PROBS, "flavour_label", "mcEventWeight"]
    np.testing.assert_array_equal(jets["mcEventWeight"], src["mcEventWeight"])
    with pytest.raises(ConfigError, match="variable 'GN2_pb' has the name of a prediction"):
        evaluate(compose_evaluate(run_dir, *args, "extra_jet_vars=[GN2_pb]", "data.test_suffix=c"))


def test_track_variables_copied_slot_by_slot(trained) -> None:
    """extra_track_vars writes the tracks dataset (without write_tracks); a variable the file
    lacks is one error before the model runs, and the earlier results stay as they were."""
    run_dir, test_file = trained
    args = ("data.num_test=200", "data.test_suffix=trk")
    result = evaluate(
        compose_evaluate(run_dir, *args, "extra_track_vars=[d0,numberOfPixelHits,valid]")
    )
    with h5py.File(result.predictions) as out, h5py.File(test_file) as f:
        tracks, src = out["tracks"][:], f["tracks"][:200]
    names = list(tracks.dtype.names)
    assert names[-5:] == [
        "ftagTruthOriginLabel",
        "ftagTruthVertexIndex",
        "valid",
        "d0",
        "numberOfPixelHits",
    ]
    assert "GN2_VertexIndex" in names and "GN2_pfromB" in names
    assert tracks.shape == src.shape  # every slot, padded ones too
    for name in ("d0", "numberOfPixelHits", "valid"):
        assert tracks.dtype[name] == src.dtype[name]
        np.testing.assert_array_equal(tracks[name], src[name])
    outputs = [p for p in outputs_of(run_dir, test_file, "trk") if p.exists()]
    saved = {p: p.read_bytes() for p in outputs}
    bad = compose_evaluate(
        run_dir, *args, "overwrite=true", "extra_track_vars=[d0,numberOfPixelHitz]"
    )
    with pytest.raises(
        DataError,
        match=r"test\.h5: dataset 'tracks' has no variable 'numberOfPixelHitz' "
        r"\(extra_track_vars\)\. Closest available: numberOfPixelHits",
    ):
        evaluate(bad)
    assert {p: p.read_bytes() for p in outputs} == saved
    assert not [p for p in (run_dir / "ckpts").iterdir() if p.name.startswith(".")]


def test_half_precision_outputs_and_their_performance(trained, evaluated) -> None:
    """Predicted values as float16, copied variables in their own type; the performance is
    ftag's on the half-precision file."""
    run_dir, _ = trained
    result = evaluate(
        compose_evaluate(
            run_dir,
            "half_precision=true",
            "extra_track_vars=[d0]",
            "data.num_test=300",
            "data.test_suffix=half",
        )
    )
    with h5py.File(result.predictions) as out, h5py.File(evaluated.predictions) as full:
        jets, tracks = out["jets"][:], out["tracks"][:]
        full_jets = full["jets"][:300]
    assert all(jets.dtype[p] == np.float16 for p in PROBS)
    assert jets.dtype["pt_btagJes"] == np.float32 and jets.dtype["flavour_label"] == np.int32
    assert tracks.dtype["GN2_pfromB"] == np.float16 and tracks.dtype["d0"] == np.float32
    assert tracks.dtype["GN2_VertexIndex"] == np.int16
    for p in PROBS:
        np.testing.assert_allclose(jets[p], full_jets[p], atol=1e-3)
    np.testing.assert_array_equal(jets["pt_btagJes"], full_jets["pt_btagJes"])
    rej, cuts, _ = ftag_numbers(result.predictions)
    for i, wp in enumerate((60, 70, 77, 85)):
        row = result.performance.working_points[wp]
        assert row["cut"] == cuts[i] and row["light_rejection"] == rej["light"][i]


def test_tau_fraction(trained) -> None:
    run_dir, _ = trained
    result = evaluate(
        compose_evaluate(run_dir, "f_tau=0.05", "data.num_test=300", "data.test_suffix=ftau")
    )
    saved = yaml.safe_load(result.performance_file.read_text())
    assert saved["f_tau"] == 0.05
    assert saved["fraction_values"] == {"fc": 0.2, "fu": 0.75, "ftau": 0.05}
    rej, cuts, _ = ftag_numbers(result.predictions, f_tau=0.05)
    assert rej["light"][1] != ftag_numbers(result.predictions)[0]["light"][1]  # p_tau counts
    for i, wp in enumerate((60, 70, 77, 85)):
        row = result.performance.working_points[wp]
        assert row["cut"] == cuts[i] and row["tau_rejection"] == rej["tau"][i]


def test_regression_outputs_keep_their_target_names(tmp_path: Path) -> None:
    """``<model>_<target>``, as the old tool wrote them; two tasks of one target get
    ``<model>_<task>``."""
    sample = tmp_path / "sample"
    write_sample(sample, 200, seed=4)
    tasks = {
        name: {"type": "regression", "input": "jets", "label": label, "hidden_layers": [8]}
        for name, label in (("ntrk", "n_tracks"), ("ntrk_huber", "n_tracks"), ("pt", "pt_btagJes"))
    }
    run_dir = make_run_dir(tmp_path, sample, tasks=tasks)
    result = evaluate(compose_evaluate(run_dir, "half_precision=true"))
    jets = jets_of(result.predictions)
    names = [n for n in jets.dtype.names if n.startswith("GN2_") and n not in PROBS]
    assert names == ["GN2_ntrk", "GN2_ntrk_huber", "GN2_pt_btagJes"]
    assert all(jets.dtype[n] == np.float16 and np.isfinite(jets[n]).all() for n in names)


# ---- the pieces ---------------------------------------------------------------------------
def test_output_names() -> None:
    assert sample_name("pp_output_test_ttbar.h5") == "ttbar"
    assert sample_name("/data/test.h5") == "test"
    path = predictions_path(
        "logs/r/ckpts/epoch=003-val_loss=0.61234.ckpt", "x_test_zprime.h5", "v2"
    )
    assert path == Path("logs/r/ckpts/epoch=003-val_loss=0.61234__test_zprime_v2.h5")
    assert predictions_path("a/last.ckpt", "t.h5", "_b").name == "last__test_t_b.h5"


def test_ftags_writer_takes_no_file_object(tmp_path: Path) -> None:
    """Why the predictions are written with h5py, not atlas-ftag-tools' H5Writer: it opens the
    file by its path itself, so it cannot write through `H5Output`'s file object, which keeps
    a full disk from ending the process in a segmentation fault. If this fails, H5Writer takes
    one now: salt.evaluation.predictions could write through it."""
    from ftag.hdf5 import H5Writer

    # h5py itself writes to any binary file object (H5Output's is one)
    with open(tmp_path / "out.h5", "w+b") as sink, pytest.raises(TypeError, match="PathLike"):
        H5Writer(
            dst=sink,
            dtypes={"jets": np.dtype([("GN2_pb", "f4")])},
            shapes={"jets": (10,)},
            shuffle=False,
        )


def test_discriminant_and_rejections() -> None:
    probs = np.array([[0.5, 0.25, 0.15, 0.1]], dtype=np.float32)
    d = discriminant(probs, ["b", "c", "u", "tau"], 0.2)  # p_tau left out with f_tau = 0
    assert d[0] == pytest.approx(np.log(0.5 / (0.2 * 0.25 + 0.8 * 0.15)), rel=1e-6)
    d = discriminant(probs, ["bjets", "cjets", "ujets", "taujets"], 0.2, 0.1)  # ftag's names
    assert d[0] == pytest.approx(np.log(0.5 / (0.2 * 0.25 + 0.7 * 0.15 + 0.1 * 0.1)), rel=1e-6)
    signal, background = np.arange(1000.0), np.arange(100.0)
    rej, err, cuts = rejections(signal, background, np.array([0.91, 0.5]))
    assert cuts[0] == pytest.approx(90.0, abs=0.5)  # 9% of the signal lies below
    k = (background >= cuts[0]).sum()  # 10 of 100
    assert rej[0] == 100 / k and rej[1] == np.inf and np.isnan(err[1])
    assert err[0] == pytest.approx(np.sqrt(0.1 * 0.9 / 100) / 0.1**2)
    empty = rejections(signal, np.array([]), np.array([0.5]))
    assert np.isnan(empty[0]).all() and np.isnan(empty[1]).all() and np.isfinite(empty[2]).all()


def test_class_names_map_to_ftag_flavours() -> None:
    assert flavour_of("b") is Flavours["bjets"] and flavour_of("bjets") is Flavours["bjets"]
    assert flavour_of("u").name == "ujets" and flavour_of("tau").px == "ptau"
    assert flavour_of("fromB") is None
    # the predictions file names a class as puma looks for it
    assert class_field("GN2", "b") == class_field("GN2", "bjets") == "GN2_pb"
    assert class_field("GN2", "taujets") == "GN2_ptau"
    assert class_field("GN2", "fromB", "track_origin") == "GN2_track_origin_pfromB"


def test_performance_of_a_perfect_and_a_useless_tagger() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    perfect = np.eye(3, dtype=np.float32)[labels] * 0.98 + 0.01
    perf = b_tagging_performance(JetScores(["b", "c", "u"], perfect, labels))
    assert perf.working_points[70]["light_rejection"] == np.inf
    useless = np.full((3000, 3), 1 / 3, dtype=np.float32) + rng.normal(0, 1e-3, (3000, 3))
    perf = b_tagging_performance(JetScores(["b", "c", "u"], useless.astype(np.float32), labels))
    assert perf.working_points[70]["light_rejection"] == pytest.approx(1 / 0.7, rel=0.1)
    with pytest.raises(ValueError, match="needs jet classes"):
        b_tagging_performance(JetScores(["b", "light"], useless[:, :2], labels))
    # ftag's class names give the same numbers
    named = b_tagging_performance(JetScores(["bjets", "cjets", "ujets"], perfect, labels))
    assert (
        named.working_points
        == b_tagging_performance(JetScores(["b", "c", "u"], perfect, labels)).working_points
    )
    with pytest.raises(ConfigError, match=r"f_tau=0\.1: .* no tau class"):
        b_tagging_performance(JetScores(["b", "c", "u"], perfect, labels), 0.2, [70], 0.1)


def test_map_labels() -> None:
    """The evaluation's truth classes: the training's mapping (salt.data.labels), a value the
    model has no class for in no class (-1)."""
    spec = LabelSpec({5: 0, 4: 1, 0: 2}, 3)
    classes, unknown = class_indices(np.array([5, 4, 0, 15]), spec)
    assert classes.tolist() == [0, 1, 2, -1]
    assert unknown.tolist() == [False, False, False, True]
    classes, unknown = class_indices(np.array([0, 2, 3, -1]), LabelSpec(None, 3))
    assert classes.tolist() == [0, 2, -1, -1]
    assert unknown.tolist() == [False, False, True, False]


# ---- outputs on a full or read-only disk ---------------------------------------------------
FULL_DISK_ADVICE = (
    "nothing was written (earlier results unchanged). Free space (or raise the quota) and run "
    "the same command again."
)


def outputs_of(run_dir: Path, test_file: Path, suffix: str = "") -> tuple[Path, Path, Path]:
    """The predictions, performance and ROC files an evaluation of the best checkpoint writes."""
    from salt.evaluate import output_paths

    best = ckpt.best_checkpoint(run_dir / "ckpts")
    assert best is not None
    return output_paths(predictions_path(best, test_file, suffix))


def jets_of(path: Path) -> np.ndarray:
    with h5py.File(path) as f:
        return f["jets"][:]


@pytest.mark.slow  # a real evaluation process (its exit is what crashed)
def test_full_disk_while_writing_predictions_is_one_line(
    trained_run: TrainedRun, tmp_path: Path
) -> None:
    """The predictions do not fit: HDF5's failed writes made the process end in a segmentation
    fault after "Exception ignored ... Can't close file" tracebacks and training advice."""
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        run_dir = copy_run(trained_run.run_dir, disk)
        before = sorted((run_dir / "ckpts").iterdir())
        filler = fill_disk(disk, leave=100_000)  # the predictions with tracks take ~380 kB
        args = [f"run_dir={run_dir}", "progress_bar=false", "write_tracks=true"]
        proc = subprocess.run(
            [sys.executable, "-m", "salt.evaluate", *args],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        predictions = outputs_of(run_dir, trained_run.test_file)[0]
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
        (line,) = [x for x in proc.stderr.splitlines() if x.startswith("salt: error:")]
        head, _, rest = line.partition(" MiB free in ")
        assert head.startswith(
            f"salt: error: could not write {predictions}: No space left on device; "
        )
        assert float(head.rsplit("; ", 1)[1]) < 0.2  # the free space, as it is
        assert rest == f"{predictions.parent}; {FULL_DISK_ADVICE}"
        assert sorted((run_dir / "ckpts").iterdir()) == before  # no partial file holds space
        filler.unlink()
        result = evaluate(compose_evaluate(run_dir, "write_tracks=true"))  # the same command
        assert result.predictions == predictions and len(jets_of(predictions)) == 750


def test_full_disk_at_the_roc_plot_leaves_nothing_and_the_rerun_completes(
    trained_run: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plot, written last, does not fit: the predictions and performance written before
    it are not left behind either (the rerun used to refuse because the predictions existed),
    and a failed overwrite keeps the earlier complete results."""
    args = ("data.num_test=300",)
    reference = evaluate(compose_evaluate(copy_run(trained_run.run_dir, tmp_path / "ref"), *args))
    pred_size, perf_size, roc_size = (
        p.stat().st_size
        for p in (reference.predictions, reference.performance_file, reference.roc_file)
    )
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        run_dir = copy_run(trained_run.run_dir, disk)
        ckpts = run_dir / "ckpts"
        before = sorted(ckpts.iterdir())
        outputs = outputs_of(run_dir, trained_run.test_file)
        # room for the predictions and the performance, and half the plot
        filler = fill_disk(disk, leave=pred_size + perf_size + roc_size // 2)
        cfg = compose_evaluate(run_dir, *args)
        err = entry_point_error(evaluate, cfg, capsys)
        assert err.startswith(f"salt: error: could not write {outputs[2]}: No space left on")
        assert err.strip().endswith(FULL_DISK_ADVICE) and len(err.strip().splitlines()) == 1
        assert sorted(ckpts.iterdir()) == before  # no new file, no temporary one
        filler.unlink()
        again = evaluate(cfg)  # the same command: not refused, complete
        np.testing.assert_array_equal(jets_of(again.predictions), jets_of(reference.predictions))
        assert again.roc_file is not None and again.roc_file.stat().st_size > 0
        saved = {p: p.read_bytes() for p in outputs}
        # overwrite=true on a full disk: the earlier complete set stays as it was
        fill_disk(disk, leave=pred_size // 2)
        cfg = compose_evaluate(run_dir, *args, "overwrite=true")
        err = entry_point_error(evaluate, cfg, capsys)
        assert err.startswith(f"salt: error: could not write {outputs[0]}: No space left on")
        assert {p: p.read_bytes() for p in outputs} == saved
        assert sorted(p.name for p in ckpts.iterdir()) == sorted(
            [*(p.name for p in before), *(p.name for p in outputs)]
        )


def test_read_only_run_directory_is_one_line_before_any_work(
    trained_run: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = copy_run(trained_run.run_dir, tmp_path / "src")
    with read_only_view(source, tmp_path / "ro") as run_dir:
        predictions = outputs_of(run_dir, trained_run.test_file)[0]
        err = entry_point_error(evaluate, compose_evaluate(run_dir, "data.num_test=50"), capsys)
        assert err.strip() == (
            f"salt: error: could not write {predictions}: Read-only file system; salt needs "
            f"write permission in {predictions.parent} (on a writable file system); nothing was "
            "written (earlier results unchanged). Make it writable, or copy the checkpoint to a "
            "writable directory and pass ckpt_path=<copy> (the outputs are written beside the "
            "checkpoint)."
        )
        assert "evaluating" not in capsys.readouterr().out  # refused before the model ran
        # the advice works: the checkpoint copied to a writable place
        mine = tmp_path / "mine"
        mine.mkdir()
        best = ckpt.best_checkpoint(run_dir / "ckpts")
        assert best is not None
        copy = mine / "best.ckpt"
        copy.write_bytes(best.read_bytes())
        result = evaluate(compose_evaluate(run_dir, f"ckpt_path={copy}", "data.num_test=50"))
        assert result.predictions == mine / "best__test_test.h5"


# ---- the run reads its own copies ---------------------------------------------------------
@pytest.fixture(scope="module")
def renamed_dicts_run(
    tmp_path_factory: pytest.TempPathFactory, trained_run: TrainedRun
) -> tuple[Path, Path]:
    """(run dir, original norm dict): a run trained one epoch with its dicts named
    ``my_norms.yaml`` and ``weights.yaml`` (the copies used to keep those names, and
    evaluation then read the original norm dict)."""
    from salt.train import train

    root = tmp_path_factory.mktemp("renamed_dicts")
    dicts = root / "dicts"
    dicts.mkdir()
    norms = dicts / "my_norms.yaml"
    norms.write_bytes((trained_run.sample / "norm_dict.yaml").read_bytes())
    weights = dicts / "weights.yaml"
    weights.write_bytes((trained_run.sample / "class_dict.yaml").read_bytes())
    logs = root / "logs"
    cfg = trained_run.compose(
        logs, "trainer.max_epochs=1", f"data.norm_dict={norms}", f"data.class_dict={weights}"
    )
    train(cfg, overrides=[])
    (run_dir,) = logs.iterdir()
    return run_dir, norms


def spoil_norm_dict(path: Path) -> None:
    """Edit a norm dict as a user might after training: other means and widths."""
    norms = yaml.safe_load(path.read_text())
    for variables in norms.values():
        for stats in variables.values():
            stats["mean"], stats["std"] = stats["mean"] + 1.0, stats["std"] * 3.0
    path.write_text(yaml.safe_dump(norms))


@pytest.mark.slow  # trains a run, evaluates and exports it three times, trains it again
def test_evaluation_and_export_read_the_run_directorys_copies(
    renamed_dicts_run: tuple[Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from salt.export import export

    run_dir, original = renamed_dicts_run
    assert {"norm_dict.yaml", "class_dict.yaml"} <= {p.name for p in run_dir.iterdir()}
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.data.norm_dict == str((run_dir / "norm_dict.yaml").resolve())
    assert saved.data.class_dict == str((run_dir / "class_dict.yaml").resolve())
    meta = yaml.safe_load((run_dir / "metadata.yaml").read_text())
    assert meta["data"]["norm_dict"] == {"path": str(original), "copy": "norm_dict.yaml"}

    def outputs(tag: str) -> tuple[np.ndarray, bytes]:
        result = evaluate(compose_evaluate(run_dir, "data.num_test=200", f"data.test_suffix={tag}"))
        overrides = [f"run_dir={run_dir}", f"output={tmp_path / tag}.onnx", "parity.num_jets=50"]
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            cfg = compose("export", overrides=overrides)
        return jets_of(result.predictions), export(cfg).path.read_bytes()

    jets, model = outputs("first")
    spoil_norm_dict(original)  # edited after training
    edited_jets, edited_model = outputs("edited")
    np.testing.assert_array_equal(edited_jets, jets)
    assert edited_model == model
    original.rename(original.with_name("moved.yaml"))  # moved after training
    moved_jets, moved_model = outputs("moved")
    np.testing.assert_array_equal(moved_jets, jets)
    assert moved_model == model
    # the saved config.yaml trains the run again, with the run's own dicts
    from salt.train import train

    with initialize_config_dir(config_dir=str(run_dir), version_base=None):
        cfg = compose("config", overrides=[f"log_dir={tmp_path / 'logs'}"])
    train(cfg, overrides=[])
    (again,) = (tmp_path / "logs").iterdir()
    for name in ("norm_dict.yaml", "class_dict.yaml"):
        assert (again / name).read_bytes() == (run_dir / name).read_bytes()
    assert_same_weights(again, run_dir)


def assert_same_weights(a: Path, b: Path) -> None:
    wa = ckpt.load_checkpoint(a / "ckpts" / ckpt.LAST)["model"]
    wb = ckpt.load_checkpoint(b / "ckpts" / ckpt.LAST)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_run_directory_of_an_older_salt_still_evaluates(
    renamed_dicts_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Older salt copied each dict under its original's name and kept the original's path in
    config.yaml: such a run directory evaluates from its copy, whatever the original holds."""
    run_dir, original = renamed_dicts_run
    reference = evaluate(compose_evaluate(copy_run(run_dir, tmp_path / "new"), "data.num_test=100"))
    old = copy_run(run_dir, tmp_path / "old")
    (old / "norm_dict.yaml").rename(old / "my_norms.yaml")
    (old / "class_dict.yaml").rename(old / "weights.yaml")
    saved = OmegaConf.load(old / "config.yaml")
    stale = tmp_path / "dicts" / original.name  # the original, since edited
    stale.parent.mkdir()
    stale.write_bytes((old / "my_norms.yaml").read_bytes())
    spoil_norm_dict(stale)
    saved.data.norm_dict = str(stale)
    saved.data.class_dict = str(tmp_path / "dicts" / "weights.yaml")  # since moved
    OmegaConf.save(saved, old / "config.yaml")
    result = evaluate(compose_evaluate(old, "data.num_test=100"))
    np.testing.assert_array_equal(jets_of(result.predictions), jets_of(reference.predictions))
    # no copy in the run directory: one line naming where it belongs, never the original
    (old / "my_norms.yaml").unlink()
    cfg = compose_evaluate(old, "data.num_test=100", "overwrite=true")
    err = entry_point_error(evaluate, cfg, capsys)
    assert err.strip() == (
        f"salt: error: {old / 'norm_dict.yaml'}: norm_dict not found; training copies the "
        "norm_dict it used into the run directory, and evaluation and export read only that "
        f"copy. Copy the norm_dict this run was trained with ({stale}) to "
        f"{old / 'norm_dict.yaml'}."
    )
