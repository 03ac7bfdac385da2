"""FTAG file reading: values, masks, labels and the bad-input errors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from salt.data.ftag import DataError, FTAGReader, LabelSpec, class_weights, load_yaml_dict
from tests.conftest import JET_VARS, TRACK_VARS, norm_dict_for, write_ftag_file

VARS = {"jets": JET_VARS, "tracks": TRACK_VARS}


def reader(path: Path, norm: dict | None = None, **kw) -> FTAGReader:
    return FTAGReader(path, VARS, norm or norm_dict_for(path), **kw)


def direct(path: Path, start: int, stop: int, compact: bool = False) -> dict[str, np.ndarray]:
    """The expected arrays, computed with plain h5py + numpy."""
    norm = norm_dict_for(path)
    with h5py.File(path) as f:
        jets, tracks = f["jets"][start:stop], f["tracks"][start:stop]
    if compact:
        order = np.argsort(~tracks["valid"], axis=1, kind="stable")
        tracks = np.take_along_axis(tracks, order, axis=1)
    valid = tracks["valid"]
    j = np.stack(
        [(jets[v] - norm["jets"][v]["mean"]) / norm["jets"][v]["std"] for v in JET_VARS], -1
    )
    t = np.stack(
        [
            (tracks[v].astype(np.float64) - norm["tracks"][v]["mean"]) / norm["tracks"][v]["std"]
            for v in TRACK_VARS
        ],
        -1,
    )
    t[~valid] = 0
    return {
        "jets": j,
        "tracks": t,
        "valid": valid,
        "origin": np.where(valid, tracks["ftagTruthOriginLabel"], -1),
    }


@pytest.mark.parametrize("scattered", [False, True])
def test_values_equal_direct_computation(tmp_path: Path, scattered: bool) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=50, scattered=scattered)
    labels = {"tracks": {"ftagTruthOriginLabel": None}, "jets": {"flavour_label": None}}
    for compact in (False, True):
        inputs, masks, got = reader(path, labels=labels, compact_tracks=compact).load(5, 45)
        want = direct(path, 5, 45, compact=compact)
        assert inputs["jets"].dtype == np.float32 and inputs["tracks"].dtype == np.float32
        np.testing.assert_allclose(inputs["jets"], want["jets"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(inputs["tracks"], want["tracks"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(~masks["tracks"], want["valid"])
        np.testing.assert_array_equal(got["tracks"]["ftagTruthOriginLabel"], want["origin"])
        np.testing.assert_array_equal(got["jets"]["flavour_label"].dtype, np.int64)
        if compact:  # real tracks first, their order kept
            v = ~masks["tracks"]
            assert (v[:, 1:] <= v[:, :-1]).all()


def test_label_map_applied_and_unmapped_value_rejected(ftag_file: Path) -> None:
    labels = {"jets": {"HadronConeExclTruthLabelID": {5: 0, 4: 1, 0: 2}}}
    got = reader(ftag_file, labels=labels).load(0, 100)[2]
    with h5py.File(ftag_file) as f:
        want = f["jets"]["flavour_label"]
    np.testing.assert_array_equal(got["jets"]["HadronConeExclTruthLabelID"], want)
    bad = {"jets": {"HadronConeExclTruthLabelID": {5: 0, 4: 1}}}
    with pytest.raises(DataError, match=r"HadronConeExclTruthLabelID.*\[0\] not in its label_map"):
        reader(ftag_file, labels=bad).load(0, 100)
    ignored = {"jets": {"HadronConeExclTruthLabelID": {5: 0, 4: 1, 0: -1}}}
    mapped = reader(ftag_file, labels=ignored).load(0, 100)[2]["jets"]
    assert set(np.unique(mapped["HadronConeExclTruthLabelID"])) <= {-1, 0, 1}


def test_label_outside_class_count(ftag_file: Path) -> None:
    labels = {"jets": {"flavour_label": LabelSpec(num_classes=2)}}
    with pytest.raises(DataError, match=r"flavour_label.*\[2\] outside \[0, 2\)"):
        reader(ftag_file, labels=labels).load(0, 100)
    named = {"jets": {"flavour_label": LabelSpec(num_classes=2, task="jets2")}}
    with pytest.raises(DataError, match=r"2 classes of task jets2.*model.tasks.jets2.label_map"):
        reader(ftag_file, labels=named).load(0, 100)


@pytest.mark.parametrize(("value", "ok"), [(-1, True), (-2, False), (np.nan, False)])
def test_negative_and_non_finite_class_labels(tmp_path: Path, value: float, ok: bool) -> None:
    """-1 marks a label the loss ignores; other negative or non-finite values are refused."""
    path = write_ftag_file(tmp_path / "f.h5", n_jets=20)
    norm = norm_dict_for(path)
    with h5py.File(path, "r+") as f:
        jets = f["jets"][:].astype(
            [
                ("flavour_label", "f4") if n == "flavour_label" else (n, t)
                for n, t in f["jets"].dtype.descr
            ]
        )
        jets["flavour_label"][4] = value
        del f["jets"]
        f.create_dataset("jets", data=jets)
    labels = {"jets": {"flavour_label": LabelSpec(num_classes=3)}}
    if ok:
        got = reader(path, norm, labels=labels).load(0, 20)[2]["jets"]["flavour_label"]
        assert got[4] == -1
    else:
        with pytest.raises(DataError, match=r"f.h5: 'jets' label 'flavour_label' has .* jet 4"):
            reader(path, norm, labels=labels).load(0, 20)
    # a vertexing-like label without a class count is passed on as it is
    free = {"jets": {"flavour_label": LabelSpec()}}
    if not np.isnan(value):
        assert reader(path, norm, labels=free).load(0, 20)[2]["jets"]["flavour_label"][4] == value


def test_dataset_shape_must_match_the_input_type(ftag_file: Path) -> None:
    norm = norm_dict_for(ftag_file)
    with h5py.File(ftag_file, "r+") as f:
        flat = f["tracks"][:, 0]
        del f["tracks"]
        f.create_dataset("tracks", data=flat)
    with pytest.raises(
        DataError,
        match=r"dataset 'tracks' has shape \(100,\); the model reads tracks as a sequence per "
        r"jet: expected \(n_jets, n_tracks\) with a 'valid' field",
    ):
        reader(ftag_file, norm)
    with pytest.raises(DataError, match=r"reads tracks \(a sequence per jet\) and jets \(one row"):
        FTAGReader(ftag_file, VARS, norm, input_map={"jets": "tracks"})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.h5: file not found"):
        FTAGReader(tmp_path / "nope.h5", VARS, {})


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    path.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(DataError, match=r"bad.h5: not a readable HDF5 file"):
        FTAGReader(path, VARS, {})


def test_missing_dataset(ftag_file: Path) -> None:
    with pytest.raises(
        DataError, match=r"train.h5: no dataset 'hits'. Datasets in file: \['jets', 'tracks'\]"
    ):
        FTAGReader(
            ftag_file,
            {"hits": ["x"]},
            {"hits": {"x": {"mean": 0, "std": 1}}},
            input_map={"hits": "hits"},
        )


def test_missing_variable_lists_closest(ftag_file: Path) -> None:
    norm = norm_dict_for(ftag_file)
    norm["tracks"]["d0_sig"] = {"mean": 0, "std": 1}
    with pytest.raises(
        DataError,
        match=r"dataset 'tracks' has no variable 'd0_sig'; expected by model.variables.tracks. "
        r"Closest available: d0",
    ):
        FTAGReader(ftag_file, {"tracks": ["d0_sig"]}, norm)
    labels = {"jets": {"flavour": LabelSpec(None, 3, task="jet_classification")}}
    with pytest.raises(
        DataError, match=r"no variable 'flavour'; expected by model.tasks.jet_classification.label"
    ):
        reader(ftag_file, labels=labels)


def test_variable_missing_from_norm_dict(ftag_file: Path) -> None:
    norm = norm_dict_for(ftag_file)
    del norm["tracks"]["d0"]
    with pytest.raises(DataError, match=r"norm_dict\['tracks'\] has no entry for variable 'd0'"):
        reader(ftag_file, norm)


def test_zero_std(ftag_file: Path) -> None:
    norm = norm_dict_for(ftag_file)
    norm["jets"]["eta_btagJes"]["std"] = 0.0
    with pytest.raises(DataError, match=r"norm_dict\['jets'\]\['eta_btagJes'\] has mean=.*std=0.0"):
        reader(ftag_file, norm)


def test_non_finite_input(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "nan.h5", n_jets=20)
    norm = norm_dict_for(path)
    with h5py.File(path, "r+") as f:
        tracks = f["tracks"][:]
        tracks["d0"][7, 0] = np.nan
        tracks["valid"][7, 0] = True
        tracks["d0"][3, -1] = np.inf  # on a padded slot: ignored
        tracks["valid"][3, -1] = False
        f["tracks"][...] = tracks
    with pytest.raises(
        DataError, match=r"nan.h5: non-finite value .* 'tracks' variable 'd0' at jet 7"
    ):
        reader(path, norm).load(0, 20)
    inputs = reader(path, norm, nan_policy="replace").load(0, 20)[0]
    assert np.isfinite(inputs["tracks"]).all()
    assert inputs["tracks"][7, 0, 0] == 0.0


def test_mismatched_lengths(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=20)
    norm = norm_dict_for(path)
    with h5py.File(path, "r+") as f:
        jets = f["jets"][:10]
        del f["jets"]
        f.create_dataset("jets", data=jets)
    with pytest.raises(DataError, match=r"different numbers of jets: \{'jets': 10, 'tracks': 20\}"):
        reader(path, norm)


def test_empty_dataset(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=20)
    norm = norm_dict_for(path)
    with h5py.File(path, "r+") as f:
        for name in ("jets", "tracks"):
            empty = f[name][:0]
            del f[name]
            f.create_dataset(name, data=empty)
    with pytest.raises(DataError, match="are empty"):
        reader(path, norm)


def test_class_weights(tmp_path: Path) -> None:
    path = tmp_path / "class_dict.yaml"
    path.write_text(yaml.safe_dump({"jets": {"flavour_label": [1.0, 2.0, 0.5]}}))
    assert class_weights(path, "jets", "flavour_label", 3) == [1.0, 2.0, 0.5]
    with pytest.raises(DataError, match=r"has 3 weights but the task has 4 classes"):
        class_weights(path, "jets", "flavour_label", 4)
    with pytest.raises(DataError, match=r"no weights for 'tracks' label 'ftagTruthOriginLabel'"):
        class_weights(load_yaml_dict(path, "class_dict"), "tracks", "ftagTruthOriginLabel", 8)


def test_truth_inputs_are_refused_unless_allowed() -> None:
    from salt.data.build import check_no_truth_inputs

    labels = {"jets": {"flavour_label": None}, "tracks": {"ftagTruthOriginLabel": None}}
    check_no_truth_inputs(VARS, labels)  # clean inputs pass
    for var, where in [
        ("HadronConeExclTruthLabelID", "jets"),
        ("flavour_label", "jets"),
        ("ftagTruthVertexIndex", "tracks"),
        ("truthPt", "jets"),
        ("TruthHadronPt", "jets"),
    ]:
        leaky = {**VARS, where: [*VARS[where], var]}
        with pytest.raises(DataError, match=rf"truth information .*{where}: {var}\."):
            check_no_truth_inputs(leaky, labels)
        check_no_truth_inputs(leaky, labels, allowed=[var])


def test_regression_target_is_read_as_its_float_value(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=20)
    with h5py.File(path, "r+") as f:
        jets = f["jets"][:]
        jets["eta_btagJes"][3] = np.nan  # a missing target: NaN, ignored by the loss
        f["jets"][...] = jets
    labels = {"jets": {"eta_btagJes": LabelSpec(continuous=True)}}
    r = FTAGReader(path, {"jets": ["pt_btagJes"]}, norm_dict_for(path), labels)
    _, _, got = r.load(0, 20)
    target = got["jets"]["eta_btagJes"]
    assert target.dtype == np.float32
    expected = jets["eta_btagJes"]
    assert np.isnan(target[3]) and np.array_equal(np.delete(target, 3), np.delete(expected, 3))
    assert not np.array_equal(np.delete(target, 3), np.round(np.delete(expected, 3)))
