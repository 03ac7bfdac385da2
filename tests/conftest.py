"""Shared fixtures: real FTAG-layout HDF5 files written by the tests, small real disks."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import salt.schema  # noqa: F401  (the config schemas, for tests that compose with Hydra)

TRACK_VARS = ["d0", "z0SinTheta", "numberOfPixelHits"]
JET_VARS = ["pt_btagJes", "eta_btagJes"]


def write_ftag_file(
    path: Path,
    n_jets: int = 100,
    n_slots: int = 10,
    seed: int = 0,
    scattered: bool = False,
) -> Path:
    """A small FTAG-layout file: jets with index-encoded values, tracks with a valid flag.

    ``pt_btagJes`` holds the row index, so tests can tell which jets a batch holds.
    """
    rng = np.random.default_rng(seed)
    jets = np.zeros(
        n_jets,
        dtype=[
            ("pt_btagJes", "f4"),
            ("eta_btagJes", "f4"),
            ("flavour_label", "i4"),
            ("HadronConeExclTruthLabelID", "i4"),
            ("n_tracks", "i4"),
        ],
    )
    jets["pt_btagJes"] = np.arange(n_jets)
    jets["eta_btagJes"] = rng.uniform(-2.5, 2.5, n_jets)
    jets["flavour_label"] = rng.integers(0, 3, n_jets)
    jets["HadronConeExclTruthLabelID"] = np.array([5, 4, 0])[jets["flavour_label"]]
    n_real = rng.integers(0, n_slots + 1, n_jets)
    n_real[0] = 0  # a jet without tracks
    jets["n_tracks"] = n_real
    tracks = np.zeros(
        (n_jets, n_slots),
        dtype=[
            ("d0", "f4"),
            ("z0SinTheta", "f2"),
            ("numberOfPixelHits", "u1"),
            ("valid", "?"),
            ("ftagTruthOriginLabel", "i1"),
            ("ftagTruthVertexIndex", "i2"),
        ],
    )
    valid = np.arange(n_slots)[None, :] < n_real[:, None]
    if scattered:
        valid = np.stack([rng.permutation(v) for v in valid])
    tracks["valid"] = valid
    tracks["d0"] = np.where(valid, rng.normal(0, 2, valid.shape), 0)
    tracks["z0SinTheta"] = np.where(valid, rng.normal(1, 3, valid.shape), 0)
    tracks["numberOfPixelHits"] = np.where(valid, rng.integers(0, 6, valid.shape), 0)
    tracks["ftagTruthOriginLabel"] = np.where(valid, rng.integers(0, 8, valid.shape), -1)
    tracks["ftagTruthVertexIndex"] = np.where(valid, rng.integers(0, 3, valid.shape), -1)
    with h5py.File(path, "w") as f:
        f.create_dataset("jets", data=jets, chunks=(min(n_jets, 64),), compression="lzf")
        f.create_dataset(
            "tracks", data=tracks, chunks=(min(n_jets, 16), n_slots), compression="lzf"
        )
        f["jets"].attrs["flavour_label"] = ["bjets", "cjets", "ujets"]
    return path


def norm_dict_for(path: Path) -> dict:
    """mean/std per variable computed directly from the file (real tracks only)."""
    with h5py.File(path) as f:
        jets, tracks = f["jets"][:], f["tracks"][:]
    real = tracks[tracks["valid"]]
    out: dict = {"jets": {}, "tracks": {}}
    for v in JET_VARS:
        out["jets"][v] = {"mean": float(jets[v].mean()), "std": float(jets[v].std())}
    for v in TRACK_VARS:
        x = real[v].astype(np.float64)
        out["tracks"][v] = {"mean": float(x.mean()), "std": float(x.std())}
    return out


def class_dict_for(path: Path) -> dict:
    """Balanced class weights n / (classes x n_class) from the file's labels (GN2's 4 jet and
    8 origin classes; a class absent from the file gets weight 1)."""
    with h5py.File(path) as f:
        flavours, tracks = f["jets"]["flavour_label"], f["tracks"][:]
    origins = tracks["ftagTruthOriginLabel"][tracks["valid"]]

    def balanced(labels: np.ndarray, num_classes: int) -> list[float]:
        counts = np.bincount(labels, minlength=num_classes)
        return [len(labels) / (num_classes * c) if c else 1.0 for c in counts.tolist()]

    return {
        "jets": {"flavour_label": balanced(flavours, 4)},
        "tracks": {"ftagTruthOriginLabel": balanced(origins, 8)},
    }


@pytest.fixture
def ftag_file(tmp_path: Path) -> Path:
    return write_ftag_file(tmp_path / "train.h5")


@pytest.fixture
def norm_dict_file(ftag_file: Path) -> Path:
    path = ftag_file.parent / "norm_dict.yaml"
    path.write_text(yaml.safe_dump(norm_dict_for(ftag_file)))
    return path


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (e.g. "256k") at ``mount_point``, so a disk really fills up
    (needs root: the test is skipped otherwise)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
