"""FTAG file reading: values, masks, labels and the bad-input errors."""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from salt.data.ftag import (
    DataError,
    FTAGReader,
    LabelSpec,
    class_weights,
    file_error,
    load_yaml_dict,
    open_h5,
)
from salt.data.labels import class_indices
from tests.conftest import (
    JET_VARS,
    TRACK_VARS,
    held_open_for_writing,
    norm_dict_for,
    run_as_nobody,
    write_ftag_file,
)

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


# ---- opening files: each cause its own words ------------------------------------------------
def test_directory_given_for_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "train.h5"
    folder.mkdir()
    with pytest.raises(DataError) as caught:
        FTAGReader(folder, VARS, {})
    assert str(caught.value) == (
        f"{folder}: is a directory; expected an HDF5 file (for many files: a glob such as "
        "dir/*.h5, or a list)."
    )
    with pytest.raises(DataError) as caught:
        load_yaml_dict(folder, "norm_dict", "data.norm_dict")
    assert str(caught.value) == (
        f"{folder}: is a directory (data.norm_dict); expected the norm_dict YAML file."
    )


def test_file_locked_by_a_writer(ftag_file: Path) -> None:
    """A second process has the file open for writing: HDF5's file lock refuses the reader."""
    with held_open_for_writing(ftag_file), pytest.raises(DataError) as caught:
        open_h5(ftag_file, "data.val_file")
    assert str(caught.value) == (
        f"{ftag_file}: unable to lock the file (data.val_file): another process has it open for "
        "writing (HDF5 file locking); expected a finished file: wait until the writer closes "
        "it, or read a copy made after."
    )
    open_h5(ftag_file).close()  # the writer is gone: the file opens


def test_filesystem_without_locks_names_the_switch(tmp_path: Path) -> None:
    """errno 38 is what HDF5 reports on a filesystem without flock (some NFS mounts); none here
    to produce it, so the error HDF5 raises there is built from its text."""
    err = OSError(
        errno.ENOSYS,
        "Unable to synchronously open file (unable to lock file, errno = 38, error message = "
        "'Function not implemented')",
    )
    message = str(file_error(tmp_path / "f.h5", err, hdf5=True))
    assert "does not support HDF5 file locking" in message
    assert "HDF5_USE_FILE_LOCKING=FALSE" in message and "\n" not in message


def test_no_read_permission(tmp_path: Path) -> None:
    """Run as the user nobody: a file of mode 000 in a directory nobody may enter."""
    folder = Path(tempfile.mkdtemp(prefix="salt-perm-"))  # not under root's 0700 pytest dir
    try:
        folder.chmod(0o755)
        locked = shutil.copy(write_ftag_file(tmp_path / "f.h5", n_jets=10), folder / "f.h5")
        norm = folder / "norm_dict.yaml"
        norm.write_text("jets: {}\n")
        for path in (locked, norm):
            Path(path).chmod(0o000)
        code = (
            "import sys; from salt.data.ftag import DataError, open_h5, load_yaml_dict\n"
            "for f in (lambda: open_h5(sys.argv[1], 'data.train_file'),\n"
            "          lambda: load_yaml_dict(sys.argv[2], 'norm_dict')):\n"
            "    try: f()\n"
            "    except DataError as err: print(err)\n"
        )
        out = run_as_nobody(code, str(locked), str(norm))
    finally:
        shutil.rmtree(folder)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"{locked}: permission denied (data.train_file): user nobody may not read it (or enter "
        "a directory above it); expected an HDF5 file readable by this user (check ls -l).",
        f"{norm}: permission denied: user nobody may not read it (or enter a directory above "
        "it); expected the norm_dict YAML file readable by this user (check ls -l).",
    ]


# ---- variables that are not numbers ---------------------------------------------------------
def retyped(path: Path, dataset: str, field: str, dtype: object, values: object) -> Path:
    """``path`` with ``dataset[field]`` stored with another dtype."""
    with h5py.File(path, "r+") as f:
        data = f[dataset][:]
        new = np.empty(
            data.shape,
            dtype=[(n, dtype if n == field else data.dtype[n]) for n in data.dtype.names],
        )
        for n in data.dtype.names:
            new[n] = values if n == field else data[n]
        del f[dataset]
        f.create_dataset(dataset, data=new)
    return path


@pytest.mark.parametrize(
    ("dtype", "values", "stored"),
    [
        ("S8", b"1.5", "strings (dtype |S8)"),  # would be parsed as a number without a word
        (h5py.string_dtype(), "abc", "variable-length strings (dtype utf-8 vlen str)"),
        (
            h5py.vlen_dtype(np.float32),
            None,
            "variable-length sequences of float32 (dtype vlen float32)",
        ),
        (("f4", (3,)), 1.0, "an array of 3 float32 per row"),  # would keep the first item
        ("c8", 1 + 2j, "complex numbers (dtype complex64)"),
    ],
    ids=["bytes", "vlen_str", "vlen_float", "subarray", "complex"],
)
def test_variable_that_is_not_a_number(
    tmp_path: Path, dtype: object, values: object, stored: str
) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=20)
    norm = norm_dict_for(path)
    if values is None:  # one sequence per jet
        values = np.empty(20, dtype=object)
        values[:] = [np.ones(1 + i % 3, np.float32) for i in range(20)]
    retyped(path, "jets", "eta_btagJes", dtype, values)
    with pytest.raises(DataError) as caught:
        reader(path, norm)
    assert str(caught.value) == (
        f"{path}: dataset 'jets' variable 'eta_btagJes' is stored as {stored}; expected a "
        "number (bool, integer or float) for model.variables.jets."
    )


def test_valid_flag_that_is_not_boolean(tmp_path: Path) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=20)
    norm = norm_dict_for(path)
    with h5py.File(path) as f:
        valid = f["tracks"]["valid"]
    retyped(path, "tracks", "valid", "i1", valid)  # 0/1 integers: read as the flag
    np.testing.assert_array_equal(~reader(path, norm).load(0, 20)[1]["tracks"], valid)
    flag = np.where(valid, 1.0, 0.0)
    flag[7, 1] = 0.5
    retyped(path, "tracks", "valid", "f4", flag)
    r = reader(path, norm)
    with pytest.raises(DataError) as caught:
        r.load(0, 20)
    r.close()  # the file is changed again below
    assert str(caught.value) == (
        f"{path}: dataset 'tracks' field 'valid' has the value 0.5 at jet 7 (slot 1); expected "
        "booleans (0 or 1) marking the real tracks."
    )
    retyped(path, "tracks", "valid", "S5", np.where(valid, b"True", b"False"))
    with pytest.raises(DataError) as caught:
        reader(path, norm)
    assert str(caught.value) == (
        f"{path}: dataset 'tracks' field 'valid' is stored as strings (dtype |S5); expected "
        "booleans (or 0/1 numbers) marking the real tracks."
    )


def test_float_label_with_fractions(tmp_path: Path) -> None:
    """0.5 would become class 0 by truncation; whole numbers stored as float are fine."""
    path = write_ftag_file(tmp_path / "f.h5", n_jets=20)
    norm = norm_dict_for(path)
    with h5py.File(path) as f:
        flavour = f["jets"]["flavour_label"].astype(np.float32)
    labels = {"jets": {"flavour_label": LabelSpec(num_classes=3)}}
    retyped(path, "jets", "flavour_label", "f4", flavour)
    got = reader(path, norm, labels=labels).load(0, 20)[2]["jets"]["flavour_label"]
    np.testing.assert_array_equal(got, flavour)
    flavour[[4, 9]] = [0.5, 2.25]
    retyped(path, "jets", "flavour_label", "f4", flavour)
    with pytest.raises(DataError) as caught:
        reader(path, norm, labels=labels).load(0, 20)
    assert str(caught.value) == (
        f"{path}: 'jets' label 'flavour_label' (stored as float32) has non-integer values "
        "[0.5, 2.25] (first at jet 4); expected integer labels: write the label as integers."
    )


# ---- label maps: keys far apart ------------------------------------------------------------
def test_label_map_lookup_costs_the_number_of_keys() -> None:
    """Keys 1e12 and -1e12 apart: the old table over the key range needed 14.6 TiB."""
    spec = LabelSpec({5: 0, 4: 1, 0: 2, -11: 3, 10**12: 4, -(10**12): -1})
    values = np.array([5, 4, 0, -11, 10**12, -(10**12), 11, 3, -(10**12) + 1, 10**13] * 100)
    tracemalloc.start()
    try:
        mapped, unknown = class_indices(values, spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000  # a few arrays of the 1000 values (8 kB each)
    np.testing.assert_array_equal(mapped[:10], [0, 1, 2, 3, 4, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(unknown[:10], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1])


def test_class_indices_give_no_class_to_nan_and_fractions() -> None:
    """The evaluation maps a test file's truth as it is: 4.5 is not class 1 (4) by truncation."""
    values = np.array([5.0, 4.5, np.nan, 0.0, -0.5])
    mapped, unknown = class_indices(values, LabelSpec({5: 0, 4: 1, 0: 2}))
    np.testing.assert_array_equal(mapped, [0, -1, -1, 2, -1])
    np.testing.assert_array_equal(unknown, [0, 1, 1, 0, 1])
    mapped, unknown = class_indices(values, LabelSpec(num_classes=6))
    np.testing.assert_array_equal(mapped, [5, -1, -1, 0, -1])
    np.testing.assert_array_equal(unknown, [0, 1, 1, 0, 1])


def test_label_map_of_signed_pdg_ids_read_exactly(tmp_path: Path) -> None:
    """int32 labels beyond float32's 2**24 (a nucleus' PDG ID) and negative ones are mapped
    by their exact value; a value not in the map is still refused."""
    path = write_ftag_file(tmp_path / "f.h5", n_jets=20)
    norm = norm_dict_for(path)
    pdg = np.array([11, -11, 1000010020, 211] * 5, dtype=np.int32)
    retyped(path, "jets", "HadronConeExclTruthLabelID", "i4", pdg)
    spec = LabelSpec({11: 0, -11: 1, 1000010020: 2, 211: -1})
    got = reader(path, norm, labels={"jets": {"HadronConeExclTruthLabelID": spec}}).load(0, 20)
    np.testing.assert_array_equal(got[2]["jets"]["HadronConeExclTruthLabelID"], [0, 1, 2, -1] * 5)
    pdg[6] = 1000010021  # float32 cannot tell it from 1000010020
    retyped(path, "jets", "HadronConeExclTruthLabelID", "i4", pdg)
    spec = LabelSpec({11: 0, -11: 1, 1000010020: 2, 211: -1}, task="jet_classification")
    with pytest.raises(DataError, match=r"values \[1000010021\] not in its label_map .* jet 6\)"):
        reader(path, norm, labels={"jets": {"HadronConeExclTruthLabelID": spec}}).load(0, 20)


# ---- norm dicts --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "jets: {pt_btagJes: {mean: 1\n  std: 2}\n",
            "norm_dict is not valid YAML (expected ',' or '}', but got ':' at line 2, column "
            "6); expected a mapping of input -> variable -> {mean, std}.",
        ),
        ("", "norm_dict must be a mapping of input -> variable -> {mean, std}, got an empty file."),
        ("- jets\n", "norm_dict must be a mapping of input -> variable -> {mean, std}, got list."),
        ("jets:\n", "norm_dict['jets'] must be a mapping of variable -> {mean, std}, got nothing."),
        (
            "jets: [pt_btagJes, eta_btagJes]\n",
            "norm_dict['jets'] must be a mapping of variable -> {mean, std}, got list.",
        ),
        (
            "jets: {pt_btagJes: {mean: 1}, eta_btagJes: {mean: 0, std: 1}}\n",
            "norm_dict['jets']['pt_btagJes'] must be {mean: float, std: float}, got {'mean': 1}.",
        ),
        (
            "jets: {pt_btagJes: {mean: 1, std: true}, eta_btagJes: {mean: 0, std: 1}}\n",
            "norm_dict['jets']['pt_btagJes'] must be {mean: float, std: float}, got {'mean': 1, "
            "'std': True}.",
        ),
        (
            "jets: {pt_btagJes: {mean: .nan, std: 1}, eta_btagJes: {mean: 0, std: 1}}\n",
            "norm_dict['jets']['pt_btagJes'] has mean=nan: expected a finite mean.",
        ),
        (
            "jets: {pt_btagJes: {mean: 1, std: -2}, eta_btagJes: {mean: 0, std: 1}}\n",
            "norm_dict['jets']['pt_btagJes'] has mean=1.0, std=-2.0: std must be finite and > 0 "
            "(a constant variable carries no information; drop it).",
        ),
        (
            "jets: {pt_btagJes: {mean: 1, std: .inf}, eta_btagJes: {mean: 0, std: 1}}\n",
            "norm_dict['jets']['pt_btagJes'] has mean=1.0, std=inf: std must be finite and > 0 "
            "(a constant variable carries no information; drop it).",
        ),
    ],
    ids=[
        "invalid_yaml",
        "empty",
        "list",
        "empty_section",
        "section_list",
        "no_std",
        "bool_std",
        "nan_mean",
        "negative_std",
        "inf_std",
    ],
)
def test_unreadable_norm_dict_names_its_file(ftag_file: Path, text: str, message: str) -> None:
    path = ftag_file.parent / "norm_dict.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        FTAGReader(ftag_file, {"jets": JET_VARS}, load_yaml_dict(path, "norm_dict"))
    assert str(caught.value) == f"{path}: {message}"


def test_hdf5_file_given_as_norm_dict(ftag_file: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_yaml_dict(ftag_file, "norm_dict", "data.norm_dict")
    assert str(caught.value) == (
        f"{ftag_file}: is an HDF5 file (data.norm_dict); expected the norm_dict YAML file."
    )


# ---- warnings -----------------------------------------------------------------------------
def test_no_valid_track_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_ftag_file(tmp_path / "f.h5", n_jets=20)
    norm = norm_dict_for(path)
    with caplog.at_level(logging.WARNING, logger="salt"):
        reader(path, norm)
    assert not caplog.records  # the conftest file has tracks
    retyped(path, "tracks", "valid", "?", False)
    with caplog.at_level(logging.WARNING, logger="salt"):
        reader(path, norm)
    assert [r.getMessage() for r in caplog.records] == [
        f"salt: {path}: no jet has a valid track (dataset 'tracks', field 'valid' is all "
        "false); the model sees no tracks: check how the file was written"
    ]
