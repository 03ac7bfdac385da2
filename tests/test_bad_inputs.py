"""The bad-input catalogue, through the entry points: every bad data file stops ``salt.train``
(and ``salt.evaluate``) with one ``salt: error:`` line naming the file, the dataset, variable or
key, and what was expected; no traceback (``debug=true`` shows it), no run directory for errors
found at set-up and no checkpoint for errors found while reading batches."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from numpy.lib import recfunctions
from omegaconf import DictConfig, OmegaConf

from salt.data.build import make_loader
from salt.data.ftag import DataError
from salt.errors import run_entry_point
from salt.evaluate import evaluate
from salt.models import build_tagger, input_variables, label_specs
from salt.models.tagger import ModelConfig
from salt.train import train
from salt.training import checkpoint as ckpt
from salt.training.run_dir import config_to_save
from tests.conftest import (
    TRACK_VARS,
    class_dict_for,
    held_open_for_writing,
    norm_dict_for,
    run_as_nobody,
    write_ftag_file,
)
from tests.test_train import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
N_JETS = 200
CLASS_WEIGHTED = ("jet_classification", "track_origin")  # GN2's tasks with class weights
# a tiny GN2 on the conftest files (3 track variables), 50-jet batches: a run takes a second
TINY = [
    "force=true",
    "logger=none",
    "trainer.progress_bar=false",
    "data=ftag",
    "data.batch_size=50",
    "data.chunk_batches=2",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    *TINY_MODEL,
    f"model.variables.tracks=[{','.join(TRACK_VARS)}]",
]


@dataclass(frozen=True)
class Files:
    train: Path
    val: Path
    norm: Path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    """Good train and val files and their norm_dict; tests spoil a copy of one."""
    data = tmp_path / "data"
    data.mkdir()
    train_file = write_ftag_file(data / "train.h5", n_jets=N_JETS)
    val = write_ftag_file(data / "val.h5", n_jets=100, seed=1)
    norm = data / "norm_dict.yaml"
    norm.write_text(yaml.safe_dump(norm_dict_for(train_file)))
    # found beside the train file, as FTAG preprocessing writes it
    (data / "class_dict.yaml").write_text(yaml.safe_dump(class_dict_for(train_file)))
    return Files(train_file, val, norm)


def make_cfg(
    tmp_path: Path, files: Files, *overrides: str, train_file: str | Path | None = None
) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(
            "train",
            overrides=[
                *TINY,
                f"log_dir={tmp_path / 'logs'}",
                f"data.train_file={train_file or files.train}",
                f"data.val_file={files.val}",
                f"data.norm_dict={files.norm}",
                *overrides,
            ],
        )


def spoil(path: Path, change: Callable[[h5py.File], None]) -> Path:
    """``path`` changed in place by ``change(open file)``."""
    with h5py.File(path, "r+") as f:
        change(f)
    return path


def replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    """A dataset with another shape or dtype (h5py cannot reshape one in place)."""
    del f[name]
    f.create_dataset(name, data=data)


def set_values(name: str, field: str, index: tuple[int, ...], value: float) -> Callable:
    """A ``spoil`` change: ``f[name][field][index] = value``; a track is made real."""

    def change(f: h5py.File) -> None:
        data = f[name][:]
        data[field][index] = value
        if name == "tracks":
            data["valid"][index] = True
        f[name][...] = data

    return change


def error_line(capsys: pytest.CaptureFixture[str], fn: Callable, cfg: DictConfig) -> str:
    """Run an entry point's body as ``python -m salt.<cmd>`` does; its one error line."""
    with pytest.raises(SystemExit) as stop:
        run_entry_point(fn, cfg)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("salt: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "DataLoader worker" not in err
    return lines[0]


def train_error(capsys: pytest.CaptureFixture[str], cfg: DictConfig) -> str:
    return error_line(capsys, train, cfg)


def no_run_dir(tmp_path: Path) -> bool:
    logs = tmp_path / "logs"
    return not logs.exists() or not any(logs.iterdir())


def no_checkpoint(tmp_path: Path) -> bool:
    return not list((tmp_path / "logs").rglob("*.ckpt"))


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT)}


def cli(tmp_path: Path, cfg_overrides: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "salt.train", *TINY, f"log_dir={tmp_path / 'logs'}"]
    return subprocess.run(
        [*cmd, *cfg_overrides],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- 1. unreadable files ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "detail"),
    [("truncated", "truncated file: eof = "), ("garbage", "file signature not found")],
)
def test_truncated_or_garbage_file_stops_at_set_up(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str], kind: str, detail: str
) -> None:
    data = files.train.read_bytes()
    rng = np.random.default_rng(0)
    bad = data[: len(data) // 2] if kind == "truncated" else rng.bytes(len(data))
    files.train.write_bytes(bad)
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line.startswith(f"salt: error: {files.train}: not a readable HDF5 file")
    assert detail in line and "Expected a complete HDF5 file" in line
    assert no_run_dir(tmp_path)


def test_corrupt_data_stops_when_read(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bytes overwritten inside the compressed track data: the file opens, reading fails."""
    with h5py.File(files.train) as f:
        chunk = f["tracks"].id.get_chunk_info(8)  # rows 128..143
    data = bytearray(files.train.read_bytes())
    data[chunk.byte_offset : chunk.byte_offset + chunk.size] = b"\x55" * chunk.size
    files.train.write_bytes(bytes(data))
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line == (
        f"salt: error: {files.train}: reading dataset 'tracks' rows 100:200 failed (corrupt or "
        "truncated file?): Can't synchronously read data (filter returned failure during read). "
        "Expected readable data; copy or produce the file again."
    )
    assert no_checkpoint(tmp_path)


def test_directory_given_as_train_file(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "data" / "train_dir"
    folder.mkdir()
    line = train_error(capsys, make_cfg(tmp_path, files, train_file=folder))
    assert line == (
        f"salt: error: {folder}: is a directory (data.train_file); expected an HDF5 file (for "
        "many files: a glob such as dir/*.h5, or a list)."
    )
    assert no_run_dir(tmp_path)


def test_val_file_being_written_by_another_process(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    with held_open_for_writing(files.val):
        line = train_error(capsys, make_cfg(tmp_path, files))
    assert line == (
        f"salt: error: {files.val}: unable to lock the file (data.val_file): another process has "
        "it open for writing (HDF5 file locking); expected a finished file: wait until the "
        "writer closes it, or read a copy made after."
    )
    assert no_run_dir(tmp_path)


def test_unreadable_file_as_another_user(tmp_path: Path, files: Files) -> None:
    """The user nobody may not read the train file: the command's one line, from
    `run_entry_point` in a process of that user."""
    folder = Path(tempfile.mkdtemp(prefix="salt-perm-"))  # not under root's 0700 pytest dir
    try:
        folder.chmod(0o755)
        train_file = Path(shutil.copy(files.train, folder / "train.h5"))
        train_file.chmod(0o000)
        code = (
            "import sys; from salt.errors import run_entry_point; "
            "from salt.data.build import resolve_files; "
            "run_entry_point(resolve_files, {'train_file': sys.argv[1], 'val_file': sys.argv[1]})"
        )
        out = run_as_nobody(code, str(train_file))
    finally:
        shutil.rmtree(folder)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"salt: error: {train_file}: permission denied (data.train_file): user nobody may not "
        "read it (or enter a directory above it); expected an HDF5 file readable by this user "
        "(check ls -l)."
    ]


# ---- 2. empty datasets --------------------------------------------------------------------
def test_empty_datasets(tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    def empty(f: h5py.File) -> None:
        for name in ("jets", "tracks"):
            replace(f, name, f[name][:0])

    spoil(files.train, empty)
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line == (
        f"salt: error: {files.train}: datasets ['jets', 'tracks'] are empty (0 jets); expected "
        "at least one jet."
    )
    assert no_run_dir(tmp_path)


# ---- 3. fewer jets than asked for ---------------------------------------------------------
def test_fewer_jets_than_num_train(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    line = train_error(capsys, make_cfg(tmp_path, files, "data.num_train=500"))
    assert line == (
        f"salt: error: {files.train}: data.num_train=500 asks for more jets than the file(s) "
        f"hold ({N_JETS}); expected at most {N_JETS}, or -1 for all jets."
    )
    assert no_run_dir(tmp_path)


# ---- 4. dataset shapes --------------------------------------------------------------------
def flat_tracks(f: h5py.File) -> None:
    replace(f, "tracks", f["tracks"][:, 0])


def tracks_without_valid(f: h5py.File) -> None:
    tracks = f["tracks"][:]
    keep = [n for n in tracks.dtype.names if n != "valid"]
    replace(f, "tracks", recfunctions.repack_fields(tracks[keep]))


def jets_2d(f: h5py.File) -> None:
    replace(f, "jets", f["jets"][:][:, None])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            flat_tracks,
            f"dataset 'tracks' has shape ({N_JETS},); the model reads tracks as a sequence per "
            "jet: expected (n_jets, n_tracks) with a 'valid' field.",
        ),
        (
            tracks_without_valid,
            f"dataset 'tracks' has shape ({N_JETS}, 10) but no 'valid' field; the model reads "
            "tracks as a sequence per jet: expected (n_jets, n_tracks) with a 'valid' field.",
        ),
        (
            jets_2d,
            f"dataset 'jets' has shape ({N_JETS}, 1); the model reads jets as one row per jet: "
            "expected (n_jets,).",
        ),
    ],
    ids=["1d_tracks", "no_valid", "2d_jets"],
)
def test_dataset_shape_the_model_cannot_read(
    tmp_path: Path,
    files: Files,
    capsys: pytest.CaptureFixture[str],
    change: Callable[[h5py.File], None],
    message: str,
) -> None:
    spoil(files.train, change)
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line == f"salt: error: {files.train}: {message}"
    assert no_run_dir(tmp_path)


def test_train_files_with_different_track_counts(tmp_path: Path, files: Files) -> None:
    """Batches never span files, so files with 10 and 6 track slots train together."""
    narrow = write_ftag_file(tmp_path / "data" / "narrow.h5", n_jets=100, n_slots=6, seed=2)
    cfg = make_cfg(
        tmp_path, files, "data.trim_tracks=false", train_file=f"[{files.train},{narrow}]"
    )
    loader = make_loader(
        OmegaConf.to_container(cfg.data, resolve=True),
        [files.train, narrow],
        files.norm,
        variables=input_variables(cfg.model),
        labels=label_specs(cfg.model),
        num_jets=-1,
        train=True,
        seed=0,
    )
    widths = [batch["inputs"]["tracks"].shape[1] for batch in loader]
    assert sorted(widths) == [6, 6, 10, 10, 10, 10]  # each batch from one file
    train(cfg)
    assert not no_checkpoint(tmp_path)


# ---- 5. jets and tracks of different lengths ----------------------------------------------
def test_jets_and_tracks_of_different_lengths(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    spoil(files.train, lambda f: replace(f, "jets", f["jets"][:150]))
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line == (
        f"salt: error: {files.train}: datasets have different numbers of jets: {{'jets': 150, "
        f"'tracks': {N_JETS}}}; each must have one row per jet."
    )
    assert no_run_dir(tmp_path)


# ---- 6. non-finite inputs -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("dataset", "variable", "index", "value"),
    [("jets", "eta_btagJes", (150,), math.nan), ("tracks", "d0", (170, 0), math.inf)],
)
def test_non_finite_input(
    tmp_path: Path,
    files: Files,
    capsys: pytest.CaptureFixture[str],
    dataset: str,
    variable: str,
    index: tuple[int, ...],
    value: float,
) -> None:
    spoil(files.train, set_values(dataset, variable, index, value))
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line == (
        f"salt: error: {files.train}: non-finite value (NaN/inf) in '{dataset}' variable "
        f"'{variable}' at jet {index[0]}; expected finite inputs. Fix the file, or set "
        "data.nan_policy=replace to replace non-finite inputs by the variable's mean."
    )
    assert no_checkpoint(tmp_path)


def test_nan_policy_replace_trains(tmp_path: Path, files: Files) -> None:
    spoil(files.train, set_values("jets", "eta_btagJes", (150,), math.nan))
    spoil(files.train, set_values("tracks", "d0", (170, 0), math.inf))
    train(make_cfg(tmp_path, files, "data.nan_policy=replace"))
    (run,) = (tmp_path / "logs").iterdir()
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "ckpts"))
    assert all(torch.isfinite(w).all() for w in state["model"].values())


# ---- 7. labels outside the class count ----------------------------------------------------
@pytest.mark.parametrize(
    ("dataset", "label", "index", "value", "message"),
    [
        (
            "jets",
            "flavour_label",
            (120,),
            4,
            "'jets' label 'flavour_label' has values [4] outside [0, 4) (first at jet 120); "
            "expected one of the 4 classes of task jet_classification, or -1 to ignore a jet. "
            "Fix the file, or map its values to classes with "
            "model.tasks.jet_classification.label_map.",
        ),
        (
            "tracks",
            "ftagTruthOriginLabel",
            (130, 0),
            8,
            "'tracks' label 'ftagTruthOriginLabel' has values [8] outside [0, 8) (first at jet "
            "130); expected one of the 8 classes of task track_origin, or -1 to ignore a track. "
            "Fix the file, or map its values to classes with model.tasks.track_origin.label_map.",
        ),
        (
            "tracks",
            "ftagTruthOriginLabel",
            (130, 0),
            -3,
            "'tracks' label 'ftagTruthOriginLabel' has values [-3] outside [0, 8) (first at jet "
            "130); expected one of the 8 classes of task track_origin, or -1 to ignore a track. "
            "Fix the file, or map its values to classes with model.tasks.track_origin.label_map.",
        ),
    ],
    ids=["jet_label_too_large", "track_label_too_large", "negative_track_label"],
)
def test_label_outside_class_count(
    tmp_path: Path,
    files: Files,
    capsys: pytest.CaptureFixture[str],
    dataset: str,
    label: str,
    index: tuple[int, ...],
    value: int,
    message: str,
) -> None:
    spoil(files.train, set_values(dataset, label, index, value))
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line == f"salt: error: {files.train}: {message}"
    assert no_checkpoint(tmp_path)


# ---- 8. a value missing from the label_map ------------------------------------------------
def test_label_map_missing_a_value(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    """GN1 maps HadronConeExclTruthLabelID {5: 0, 4: 1, 0: 2}; a tau jet (15) is not in it."""
    spoil(files.train, set_values("jets", "HadronConeExclTruthLabelID", (140,), 15))
    line = train_error(capsys, make_cfg(tmp_path, files, "model=GN1"))
    assert line == (
        f"salt: error: {files.train}: 'jets' label 'HadronConeExclTruthLabelID' has values [15] "
        "not in its label_map {5: 0, 4: 1, 0: 2} (first at jet 140); expected only the map's "
        "keys. Add them to model.tasks.jet_classification.label_map (-1 to ignore them in the "
        "loss)."
    )
    assert no_checkpoint(tmp_path)


# ---- 9. variables that are not numbers -----------------------------------------------------
def jets_eta_as_strings(f: h5py.File) -> None:
    jets = f["jets"][:]
    dtype = [(n, "S8" if n == "eta_btagJes" else jets.dtype[n]) for n in jets.dtype.names]
    new = np.empty(jets.shape, dtype=dtype)
    for n in jets.dtype.names:
        new[n] = [b"%.3f" % v for v in jets[n]] if n == "eta_btagJes" else jets[n]
    replace(f, "jets", new)


def test_variable_stored_as_strings(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    """Strings that look like numbers: HDF5 would parse them without a word."""
    spoil(files.train, jets_eta_as_strings)
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line == (
        f"salt: error: {files.train}: dataset 'jets' variable 'eta_btagJes' is stored as strings "
        "(dtype |S8); expected a number (bool, integer or float) for model.variables.jets."
    )
    assert no_run_dir(tmp_path)


# ---- 10. dicts: norm_dict and class_dict ---------------------------------------------------
def test_norm_dict_that_is_not_yaml(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    files.norm.write_text("jets: {pt_btagJes: {mean: 1\n  std: 2}\n")
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line == (
        f"salt: error: {files.norm}: norm_dict (data.norm_dict) is not valid YAML (expected ',' "
        "or '}', but got ':' at line 2, column 6); expected a mapping of input -> variable -> "
        "{mean, std}."
    )
    assert no_run_dir(tmp_path)


def test_norm_dict_std_zero_names_the_norm_dict(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    norm = yaml.safe_load(files.norm.read_text())
    norm["tracks"]["d0"]["std"] = 0.0
    files.norm.write_text(yaml.safe_dump(norm))
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line.startswith(f"salt: error: {files.norm}: norm_dict['tracks']['d0'] has mean=")
    assert line.endswith(
        "std=0.0: std must be finite and > 0 (a constant variable carries no information; drop it)."
    )
    assert no_run_dir(tmp_path)


def test_class_dict_set_but_missing(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str], caplog
) -> None:
    """Needed by the class weights: an error naming the path (it said "no class_dict was
    given"); not needed: a warning, and the run trains."""
    missing = tmp_path / "nope" / "class_dict.yaml"
    line = train_error(capsys, make_cfg(tmp_path, files, f"data.class_dict={missing}"))
    assert line == (
        f"salt: error: {missing}: class_dict not found (data.class_dict); "
        "model.tasks.jet_classification.use_class_weights and "
        "model.tasks.track_origin.use_class_weights are true and need its weights: set "
        "data.class_dict to the class_dict file, or "
        "model.tasks.jet_classification.use_class_weights=false "
        "model.tasks.track_origin.use_class_weights=false."
    )
    assert no_run_dir(tmp_path)
    unweighted = [f"model.tasks.{t}.use_class_weights=false" for t in CLASS_WEIGHTED]
    with caplog.at_level(logging.WARNING, logger="salt"):
        train(make_cfg(tmp_path, files, f"data.class_dict={missing}", *unweighted))
    assert (
        f"salt: {missing}: class_dict not found (data.class_dict); no task uses class "
        "weights, so training goes on without it." in caplog.messages
    )
    assert not no_checkpoint(tmp_path)


def test_default_class_dict_missing_names_where_it_was_looked_for(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    default = files.train.parent / "class_dict.yaml"
    default.unlink()
    line = train_error(capsys, make_cfg(tmp_path, files))
    assert line.startswith(
        f"salt: error: {default}: class_dict not found (data.class_dict not set: the default "
        "beside the first train file); "
        "model.tasks.jet_classification.use_class_weights and "
    )
    assert no_run_dir(tmp_path)


# ---- 11. warnings: readable files that are probably not what was meant ---------------------
def test_val_file_is_the_train_file(tmp_path: Path, files: Files, caplog) -> None:
    """The same file by path (through a symlink) or by inode (a hard link)."""
    from salt.data.build import resolve_files, warn_about_files

    linked = tmp_path / "data" / "linked.h5"
    linked.symlink_to(files.train)
    hard = tmp_path / "data" / "hard.h5"
    os.link(files.train, hard)
    for val in (files.val, linked, hard):
        caplog.clear()
        cfg = {"train_file": str(files.train), "val_file": str(val), "norm_dict": str(files.norm)}
        with caplog.at_level(logging.WARNING, logger="salt"):
            warn_about_files(resolve_files(cfg), class_weights_used=True)
        same = (
            f"salt: {val} (data.val_file) is the training file {files.train} "
            "(data.train_file): the validation loss is measured on training jets and will not "
            "show overfitting; use a separate validation file."
        )
        expected = [] if val == files.val else [same]
        assert caplog.messages == expected


def test_missing_test_file_is_a_warning_for_training(tmp_path: Path, files: Files, caplog) -> None:
    """Training does not read data.test_file: a typo there is reported, not fatal."""
    from salt.data.build import resolve_files, warn_about_files

    missing = tmp_path / "data" / "tset.h5"
    cfg = {
        "train_file": str(files.train),
        "val_file": str(files.val),
        "test_file": str(missing),
        "norm_dict": str(files.norm),
    }
    with caplog.at_level(logging.WARNING, logger="salt"):
        resolved = resolve_files(cfg)
        warn_about_files(resolved, class_weights_used=True)
    assert resolved.test is None
    assert caplog.messages == [
        f"salt: {missing}: file not found (data.test_file). Training goes on without it; "
        "evaluation will need it."
    ]


# ---- errors found in DataLoader workers ---------------------------------------------------
def deep_nan(files: Files) -> str:
    """A NaN in the last chunk, found only while reading batches; its message."""
    spoil(files.train, set_values("jets", "eta_btagJes", (190,), math.nan))
    return (
        f"salt: error: {files.train}: non-finite value (NaN/inf) in 'jets' variable "
        "'eta_btagJes' at jet 190; expected finite inputs. Fix the file, or set "
        "data.nan_policy=replace to replace non-finite inputs by the variable's mean."
    )


def test_worker_error_is_the_same_one_line(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = deep_nan(files)
    assert train_error(capsys, make_cfg(tmp_path, files, "data.num_workers=2")) == expected
    assert no_checkpoint(tmp_path)
    # debug=true: the error with its traceback, the worker's attached
    with pytest.raises(DataError) as caught:
        train(make_cfg(tmp_path, files, "data.num_workers=2", "debug=true"))
    assert f"salt: error: {caught.value}" == expected
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "In a DataLoader worker" in notes and "_check_finite" in notes


def test_cli_error_is_one_line_without_traceback(tmp_path: Path, files: Files) -> None:
    """The one test of the command line's error format (`python -m salt.train` in its own
    process, DataLoader workers included): every other error is checked in-process, through
    the entry point's `run_entry_point` (`train_error`, `error_line`)."""
    expected = deep_nan(files)
    out = cli(
        tmp_path,
        [
            "data.num_workers=2",
            f"data.train_file={files.train}",
            f"data.val_file={files.val}",
            f"data.norm_dict={files.norm}",
        ],
    )
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == expected
    assert sum(line.startswith("salt: error") for line in lines) == 1
    assert "Traceback" not in out.stderr and "DataLoader worker" not in out.stderr
    assert no_checkpoint(tmp_path)


def test_ddp_rank_error_is_reported_once(
    tmp_path: Path, files: Files, capfd: pytest.CaptureFixture[str]
) -> None:
    """Two ranks started by salt itself (trainer.devices=2): the failing rank's line, and
    nothing from the parent process or from torch about stopping the other rank (the ranks'
    own processes write to the captured file descriptors)."""
    spoil(files.train, flat_tracks)
    cfg = make_cfg(tmp_path, files, "trainer.devices=2", "trainer.accelerator=cpu")
    with pytest.raises(SystemExit) as stop:
        run_entry_point(train, cfg)
    assert stop.value.code == 1
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("salt: error")]
    assert errors, err
    for line in errors:  # each rank that got there first says the same, naming itself
        assert line.startswith("salt: error on rank ") and "has shape (200,)" in line
    assert "ended with" not in err and "Terminating process" not in err
    assert "Traceback" not in err
    assert no_run_dir(tmp_path)


# ---- evaluation reads its test file with the same checks ----------------------------------
def make_run_dir(tmp_path: Path, files: Files) -> Path:
    """A run directory without training: config, norm_dict and a fresh tagger's checkpoint."""
    cfg = make_cfg(tmp_path, files)
    run_dir = tmp_path / "run"
    (run_dir / "ckpts").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config_to_save(cfg)), run_dir / "config.yaml")
    shutil.copyfile(files.norm, run_dir / "norm_dict.yaml")
    state = {
        "model": build_tagger(cfg.model, loss_weights=False).state_dict(),
        "config": ModelConfig.read(cfg.model).plain(),
    }
    ckpt.save_checkpoint(state, run_dir / "ckpts" / ckpt.checkpoint_name(0, 1.0))
    return run_dir


def drop_d0(f: h5py.File) -> None:
    tracks = f["tracks"][:]
    keep = [n for n in tracks.dtype.names if n != "d0"]
    replace(f, "tracks", recfunctions.repack_fields(tracks[keep]))


def flavour_as_strings(f: h5py.File) -> None:
    jets = f["jets"][:]
    dtype = [(n, "S6" if n == "flavour_label" else jets.dtype[n]) for n in jets.dtype.names]
    new = np.empty(jets.shape, dtype=dtype)
    for n in jets.dtype.names:
        new[n] = (
            np.array([b"bjets", b"cjets", b"ujets"])[jets[n]] if n == "flavour_label" else jets[n]
        )
    replace(f, "jets", new)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            flat_tracks,
            "dataset 'tracks' has shape (100,); the model reads tracks as a sequence per jet: "
            "expected (n_jets, n_tracks) with a 'valid' field.",
        ),
        (drop_d0, "dataset 'tracks' has no variable 'd0'; expected by model.variables.tracks."),
        (
            flavour_as_strings,
            "dataset 'jets' variable 'flavour_label' is stored as strings (dtype |S6); expected "
            "integer labels for task jet_classification.",
        ),
    ],
    ids=["1d_tracks", "missing_variable", "string_truth"],
)
def test_evaluate_checks_the_test_file(
    tmp_path: Path,
    files: Files,
    capsys: pytest.CaptureFixture[str],
    change: Callable[[h5py.File], None],
    message: str,
) -> None:
    run_dir = make_run_dir(tmp_path, files)
    test_file = spoil(write_ftag_file(tmp_path / "data" / "test.h5", n_jets=100, seed=3), change)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "evaluate",
            overrides=[f"run_dir={run_dir}", "progress_bar=false", f"data.test_file={test_file}"],
        )
    line = error_line(capsys, evaluate, cfg)
    assert line == f"salt: error: {test_file}: {message}"
    assert not list((run_dir / "ckpts").glob("*__test_*"))  # no predictions file


# ---- checkpoints that are not ours ---------------------------------------------------------
@dataclass
class _Exploit:
    """Unpickling it would run a shell command that creates ``marker``."""

    marker: Path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["text", "pickle", "torch_without_marker"])
def test_checkpoint_not_ours_is_one_line_and_never_executed(
    tmp_path: Path, files: Files, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    path = tmp_path / "model.ckpt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "pickle":
        torch.save({"model": _Exploit(tmp_path / "pwned")}, path)  # unpickling runs a command
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)  # e.g. a Lightning checkpoint
    line = train_error(capsys, make_cfg(tmp_path, files, f"ckpt_path={path}"))
    assert line.startswith("salt: error:") and str(path) in line
    expected = {
        "text": "is not a salt checkpoint or truncated",
        "pickle": "refusing to load",
        "torch_without_marker": "no 'salt_checkpoint' marker",
    }[kind]
    assert expected in line
    assert not (tmp_path / "pwned").exists()
    assert no_checkpoint(tmp_path)
