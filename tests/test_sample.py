"""Tests for the built-in physics-like sample (salt.data.sample): real files, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from salt.data import sample
from salt.data.sample import (
    FLAVOUR_NAMES,
    JET_VARIABLES,
    N_TRACK_SLOTS,
    TRACK_VARIABLES,
    write_sample,
)
from salt.data.sample_objects import ELECTRON_VARIABLES, FLOW_VARIABLES
from tests.conftest import small_tmpfs

SRC = Path(sample.__file__).resolve().parents[2]
N_JETS = 2000
OUTPUT_NAMES = {"train.h5", "val.h5", "test.h5", "norm_dict.yaml", "class_dict.yaml"}
FROM_B, FROM_BC, FROM_C, FROM_TAU = 3, 4, 5, 6


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(jets, tracks) of one file."""
    with h5py.File(path, "r") as f:
        return f["jets"][:], f["tracks"][:]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sample(tmp_path_factory.mktemp("sample"), N_JETS, seed=42)


@pytest.fixture(scope="module")
def train(written: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    return read(written["train"])


def test_writes_all_outputs_and_no_temporary_files(written: dict[str, Path]) -> None:
    assert set(written) == {"train", "val", "test", "norm_dict", "class_dict"}
    out_dir = written["train"].parent
    assert {p.name for p in out_dir.iterdir()} == OUTPUT_NAMES
    assert all(written[key].parent == out_dir for key in written)


def test_jets_layout(written: dict[str, Path]) -> None:
    sizes = {"train": N_JETS, "val": N_JETS // 4, "test": N_JETS // 4}
    for split, size in sizes.items():
        with h5py.File(written[split], "r") as f:
            jets = f["jets"]
            assert jets.shape == (size,)
            assert jets.dtype.names == (
                "pt_btagJes",
                "eta_btagJes",
                "HadronConeExclTruthLabelID",
                "flavour_label",
                "n_tracks",
                "ptFromTruthDressedWZJet",
                "HadronGhostInitialTruthLabelPdgId",
            )
            assert jets.dtype["pt_btagJes"] == np.float32
            assert jets.dtype["eta_btagJes"] == np.float32
            for name in (
                "HadronConeExclTruthLabelID",
                "flavour_label",
                "n_tracks",
                "HadronGhostInitialTruthLabelPdgId",
            ):
                assert jets.dtype[name] == np.int32
            assert list(jets.attrs["flavour_label"]) == FLAVOUR_NAMES
            assert jets.compression == "lzf"
            assert jets.chunks == (min(1000, size),)


def test_tracks_layout(written: dict[str, Path]) -> None:
    with h5py.File(written["train"], "r") as f:
        tracks = f["tracks"]
        assert tracks.shape == (N_JETS, N_TRACK_SLOTS)
        assert tracks.compression == "lzf"
        assert tracks.chunks == (100, N_TRACK_SLOTS)
        names = tracks.dtype.names
    assert names == (
        *TRACK_VARIABLES,
        "valid",
        "ftagTruthOriginLabel",
        "ftagTruthVertexIndex",
        "ftagTruthTypeLabel",
    )
    assert TRACK_VARIABLES[0] == "d0" and TRACK_VARIABLES[-1] == "numberOfSCTHoles"
    dtype = tracks.dtype
    assert [dtype[n] for n in TRACK_VARIABLES[:10]] == [np.dtype(np.float32)] * 10
    assert [dtype[n] for n in TRACK_VARIABLES[10:]] == [np.dtype(np.uint8)] * 11
    assert dtype["valid"] == np.bool_
    assert dtype["ftagTruthOriginLabel"] == np.int8
    assert dtype["ftagTruthVertexIndex"].kind == "i"


def test_padding_after_real_tracks(train: tuple[np.ndarray, np.ndarray]) -> None:
    jets, tracks = train
    valid = tracks["valid"]
    n_tracks = jets["n_tracks"]
    assert np.array_equal(valid.sum(axis=1), n_tracks)
    assert np.array_equal(valid, np.arange(N_TRACK_SLOTS) < n_tracks[:, None])
    assert n_tracks.min() >= 1 and n_tracks.max() <= N_TRACK_SLOTS
    padding = tracks[~valid]
    assert (padding["ftagTruthOriginLabel"] == -1).all()
    assert (padding["ftagTruthVertexIndex"] == -1).all()
    for name in TRACK_VARIABLES:
        assert (padding[name] == 0).all(), name
    real = tracks[valid]
    assert set(np.unique(real["ftagTruthOriginLabel"])) == set(range(8))


def test_truth_vertex_index(train: tuple[np.ndarray, np.ndarray]) -> None:
    _, tracks = train
    for row in tracks[:300]:
        real = row[row["valid"]]
        origin, vertex = real["ftagTruthOriginLabel"], real["ftagTruthVertexIndex"]
        assert (vertex[origin <= 1] == -1).all()  # pileup and fakes: no vertex in the jet
        assert (vertex[origin >= 2] >= 0).all()
        # One index per vertex: primary, B, B->D, D and tau tracks each share theirs.
        shared = [np.unique(vertex[origin == o]) for o in range(2, 7) if (origin == o).any()]
        assert all(len(ids) == 1 for ids in shared)
        assert len({int(ids[0]) for ids in shared}) == len(shared)
        used = np.unique(vertex[vertex >= 0])
        assert np.array_equal(used, np.arange(used.size))  # compact: 0, 1, ...


def test_jet_labels_and_kinematics(train: tuple[np.ndarray, np.ndarray]) -> None:
    jets, _ = train
    flavour = jets["flavour_label"]
    hadron = np.array([5, 4, 0, 15])[flavour]
    assert np.array_equal(jets["HadronConeExclTruthLabelID"], hadron)
    fractions = np.bincount(flavour, minlength=4) / flavour.size
    assert np.allclose(fractions, [0.3, 0.25, 0.35, 0.1], atol=0.05)
    pt = jets["pt_btagJes"]
    assert pt.min() >= 20e3 and np.median(pt) < 60e3 and pt.max() > 150e3  # falling, in MeV
    assert np.abs(jets["eta_btagJes"]).max() < 2.5


def test_track_quantities_plausible(train: tuple[np.ndarray, np.ndarray]) -> None:
    _, tracks = train
    real = tracks[tracks["valid"]]
    fake = real["ftagTruthOriginLabel"] == 1
    assert 3 <= np.median(real["numberOfPixelHits"][~fake]) <= 5
    assert 7 <= np.median(real["numberOfSCTHits"][~fake]) <= 10
    assert real["numberOfPixelSharedHits"].mean() < 0.2
    assert (real["numberOfInnermostPixelLayerHits"] <= real["numberOfPixelHits"]).all()
    assert (real["numberOfPixelSharedHits"] <= real["numberOfPixelHits"]).all()
    # Fakes: fewer hits, worse resolution.
    assert real["numberOfPixelHits"][fake].mean() < real["numberOfPixelHits"][~fake].mean() - 1
    assert np.median(real["phiUncertainty"][fake]) > 1.5 * np.median(real["phiUncertainty"][~fake])
    # Uncertainties fall with momentum.
    p = 1 / np.abs(real["qOverP"])
    soft, hard = p < np.quantile(p, 0.25), p > np.quantile(p, 0.75)
    assert np.median(real["qOverPUncertainty"][soft]) > np.median(real["qOverPUncertainty"][hard])
    assert (real["phiUncertainty"] > 0).all() and (real["thetaUncertainty"] > 0).all()
    assert np.abs(real["dphi"]).max() < 0.6 and np.abs(real["deta"]).max() < 0.6
    # Pileup tracks sit far from the primary vertex along z.
    pileup, primary = real["ftagTruthOriginLabel"] == 0, real["ftagTruthOriginLabel"] == 2
    assert np.median(np.abs(real["z0SinTheta"][pileup])) > 5 * np.median(
        np.abs(real["z0SinTheta"][primary])
    )


def test_flavour_information(train: tuple[np.ndarray, np.ndarray]) -> None:
    jets, tracks = train
    flavour = jets["flavour_label"]
    valid = tracks["valid"]
    sig = np.where(valid, tracks["IP3D_signed_d0_significance"], -np.inf).max(axis=1)
    b_median, light_median = np.median(sig[flavour == 0]), np.median(sig[flavour == 2])
    assert b_median > 2 * light_median
    # ...but not perfectly separable: classes overlap.
    assert (sig[flavour == 2] > b_median).mean() > 0.01
    assert (sig[flavour == 0] < light_median).mean() > 0.01

    origin = np.where(valid, tracks["ftagTruthOriginLabel"], -1)
    from_b = ((origin == FROM_B) | (origin == FROM_BC)).sum(axis=1)
    assert from_b[flavour == 0].mean() > 2
    assert (from_b[flavour != 0] == 0).all()
    assert ((origin == FROM_C).sum(axis=1)[flavour != 1] == 0).all()
    assert ((origin == FROM_TAU).sum(axis=1)[flavour != 3] == 0).all()
    assert np.isin(
        (origin == FROM_TAU).sum(axis=1)[flavour == 3], [0, 1, 2, 3]
    ).all()  # 1 or 3 prongs, some lost
    n_tracks = jets["n_tracks"]
    assert n_tracks[flavour == 0].mean() > n_tracks[flavour == 2].mean()
    assert n_tracks[flavour == 3].mean() < n_tracks[flavour == 2].mean()


def test_multiplicity_grows_with_pt(train: tuple[np.ndarray, np.ndarray]) -> None:
    jets, _ = train
    pt, n_tracks = jets["pt_btagJes"], jets["n_tracks"]
    low = n_tracks[pt < np.quantile(pt, 0.25)].mean()
    high = n_tracks[pt > np.quantile(pt, 0.75)].mean()
    assert high > low + 2
    assert 8 <= n_tracks.mean() <= 15


def test_track_order_carries_no_label(train: tuple[np.ndarray, np.ndarray]) -> None:
    jets, tracks = train
    n_tracks = jets["n_tracks"]
    slot = np.broadcast_to(np.arange(N_TRACK_SLOTS), tracks.shape)
    relative = slot / np.maximum(n_tracks - 1, 1)[:, None]
    several = tracks["valid"] & (n_tracks >= 2)[:, None]
    origin = tracks["ftagTruthOriginLabel"]
    means = [relative[several & (origin == o)].mean() for o in (0, 2, FROM_B, FROM_BC)]
    assert np.allclose(means, 0.5, atol=0.05)


def test_same_seed_identical_other_seed_differs(written: dict[str, Path], tmp_path: Path) -> None:
    again = write_sample(tmp_path / "again", N_JETS, seed=42)
    other = write_sample(tmp_path / "other", N_JETS, seed=43)
    for split in ("train", "val", "test"):
        jets, tracks = read(written[split])
        jets_again, tracks_again = read(again[split])
        assert jets.tobytes() == jets_again.tobytes()
        assert tracks.tobytes() == tracks_again.tobytes()
        jets_other, _ = read(other[split])
        assert not np.array_equal(jets["pt_btagJes"], jets_other["pt_btagJes"])
    for key in ("norm_dict", "class_dict"):
        assert written[key].read_text() == again[key].read_text()
    # The splits come from independent streams.
    train_jets, _ = read(written["train"])
    val_jets, _ = read(written["val"])
    assert not np.array_equal(train_jets[: len(val_jets)], val_jets)


def test_norm_dict_matches_direct_computation(tmp_path: Path) -> None:
    # More than one generation block (20k jets), so the streaming merge across blocks is exercised.
    paths = write_sample(tmp_path, 20_500, seed=5)
    jets, tracks = read(paths["train"])
    text = paths["norm_dict"].read_text()
    assert "!!" not in text  # plain YAML floats, no python/numpy tags
    norm = yaml.safe_load(text)
    assert list(norm) == ["jets", "tracks", "flows", "electrons"]
    assert list(norm["jets"]) == JET_VARIABLES
    assert list(norm["tracks"]) == TRACK_VARIABLES
    real = tracks[tracks["valid"]]
    with h5py.File(paths["train"]) as f:
        flows, electrons = f["flows"][:], f["electrons"][:]
    for group, rows, names in (
        ("jets", jets, JET_VARIABLES),
        ("tracks", real, TRACK_VARIABLES),
        ("flows", flows[flows["valid"]], FLOW_VARIABLES),
        ("electrons", electrons[electrons["valid"]], ELECTRON_VARIABLES),
    ):
        for name in names:
            values = rows[name].astype(np.float64)
            entry = norm[group][name]
            assert set(entry) == {"mean", "std"}
            assert type(entry["mean"]) is float and type(entry["std"]) is float
            std = values.std()
            assert entry["std"] == pytest.approx(std, rel=1e-9), name
            assert entry["mean"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-12 * std), name


def test_class_dict_balanced_weights(written: dict[str, Path], train: tuple) -> None:
    jets, tracks = train
    class_dict = yaml.safe_load(written["class_dict"].read_text())
    assert list(class_dict) == ["jets", "tracks"]
    flavour_weights = class_dict["jets"]["flavour_label"]
    origin_weights = class_dict["tracks"]["ftagTruthOriginLabel"]
    assert len(flavour_weights) == 4 and len(origin_weights) == 8
    flavour_counts = np.bincount(jets["flavour_label"], minlength=4)
    origin_counts = np.bincount(tracks[tracks["valid"]]["ftagTruthOriginLabel"], minlength=8)
    assert flavour_weights == pytest.approx(flavour_counts.sum() / (4 * flavour_counts))
    assert origin_weights == pytest.approx(origin_counts.sum() / (8 * origin_counts))


def test_balanced_weights_give_absent_class_the_largest_weight() -> None:
    weights = sample._balanced_weights(np.array([10, 0, 30, 20]))
    assert weights[0] == pytest.approx(60 / (4 * 10))
    assert weights[1] == weights[0] == max(weights)
    assert weights[2] == pytest.approx(60 / (4 * 30))


def test_running_moments_merge_equals_direct() -> None:
    rng = np.random.default_rng(0)
    rows = np.zeros(5000, dtype=[("a", np.float32), ("b", np.float32)])
    rows["a"] = rng.normal(1e4, 3.0, rows.size)  # large mean, small spread: cancellation-prone
    rows["b"] = rng.exponential(2.0, rows.size)
    moments = sample._RunningMoments(["a", "b"])
    for start, stop in ((0, 7), (7, 7), (7, 2500), (2500, 5000)):
        moments.merge(moments.block_moments(rows[start:stop]))
    result = moments.result()
    for name in ("a", "b"):
        values = rows[name].astype(np.float64)
        assert result[name]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert result[name]["std"] == pytest.approx(values.std(), rel=1e-9)


def test_bad_arguments_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_jets"):
        write_sample(tmp_path, 0)
    with pytest.raises(ValueError, match="seed"):
        write_sample(tmp_path, 10, seed=-1)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_sample(not_a_dir, 10)
    assert list(tmp_path.iterdir()) == [not_a_dir]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }


def test_cli_writes_the_same_sample(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "salt.data.sample", str(out), "--jets", "120", "--seed", "3"],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == OUTPUT_NAMES
    for name in OUTPUT_NAMES:
        assert str(out / name) in result.stdout
    direct = write_sample(tmp_path / "direct", 120, seed=3)
    for split in ("train", "val", "test"):
        assert read(out / f"{split}.h5")[1].tobytes() == read(direct[split])[1].tobytes()

    bad = subprocess.run(
        [sys.executable, "-m", "salt.data.sample", str(out), "--jets", "0"],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "num_jets" in bad.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, Slurm's cancel
def test_interrupted_run_leaves_nothing_behind(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "salt.data.sample", str(out), "--jets", "5000000"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not (out.is_dir() and any(out.iterdir())):  # wait for a temporary file
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.01)
        assert all(p.name.startswith(".") for p in out.iterdir())
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum
    assert list(out.iterdir()) == []


def test_full_disk_is_one_error_and_leaves_nothing(tmp_path: Path) -> None:
    """A disk that fills while the sample is written: one DataError naming the directory and
    the free space, no file left (not even a temporary one), and no HDF5 crash at exit (in a
    subprocess, where a half-closed HDF5 file would end in a segmentation fault)."""
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        code = (
            "import sys\n"
            "from salt.data.sample import write_sample\n"
            "from salt.errors import DataError\n"
            "try:\n"
            f"    write_sample({str(disk / 'sample')!r}, 20000)\n"
            "except DataError as err:\n"
            "    print(err)\n"
            "    sys.exit(3)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert proc.stderr == ""  # no HDF5 tracebacks, no crash
        message = proc.stdout.strip()
        assert "\n" not in message
        assert message.startswith(f"{disk / 'sample'}: could not write the built-in sample")
        assert "No space left on device" in message and "MiB free there" in message
        assert list((disk / "sample").iterdir()) == []


def test_flows_and_electrons_carry_the_jets_physics(written: dict[str, Path]) -> None:
    """Charged flows are the tracks, neutral ones carry the rest of the jet's energy; real
    electrons come from b, c and tau decays, displaced and electron-like, fakes in every jet."""
    with h5py.File(written["train"]) as f:
        jets, tracks = f["jets"][:], f["tracks"][:]
        flows, electrons = f["flows"][:], f["electrons"][:]
    n_tracks = tracks["valid"].sum(1)
    charged = (flows["valid"] & flows["isCharged"]).sum(1)
    assert np.array_equal(charged, np.minimum(n_tracks, flows.shape[1]))
    neutral_pt = np.where(flows["valid"] & ~flows["isCharged"], flows["pt"], 0).sum(1)
    share = np.median(neutral_pt / jets["pt_btagJes"])
    assert 0.25 < share < 0.42  # 40% minus the objects below threshold
    # flows are pt-ordered within a jet, real ones first
    pt = np.where(flows["valid"], flows["pt"], -1)
    assert (np.diff(pt, axis=1) <= 0).all()
    origin = electrons["ftagTruthOriginLabel"]
    real = electrons["valid"] & (origin >= 1) & (origin <= 4)  # from B, B->D, D, tau
    per_flavour = [real[jets["flavour_label"] == k].any(1).mean() for k in range(4)]
    b, c, light, tau = per_flavour
    assert 0.08 < b < 0.25 and 0.02 < c < 0.12 and light == 0 and 0.05 < tau < 0.2
    fake = electrons["valid"] & (origin == 0)
    assert fake[jets["flavour_label"] == 2].any(1).mean() > 0.05  # light jets have candidates
    sig = np.abs(electrons["d0RelativeToBeamspotSignificance"])
    from_b = electrons["valid"] & (origin == 1)
    assert np.median(sig[from_b]) > 3 * np.median(sig[fake])
    assert np.median(electrons["eProbabilityHT"][real]) > 3 * np.median(
        electrons["eProbabilityHT"][fake]
    )


def test_gn3_targets_carry_physics(written: dict[str, Path]) -> None:
    """The truth jet pt is higher when a semileptonic decay's neutrino escaped; a b -> e
    electron has the initial b hadron's sign; kaons come more from D decays; padding is -1."""
    with h5py.File(written["train"]) as f:
        jets, tracks, electrons = f["jets"][:], f["tracks"][:], f["electrons"][:]
    ratio = jets["ptFromTruthDressedWZJet"] / jets["pt_btagJes"]
    origin = electrons["ftagTruthOriginLabel"]
    semileptonic = (electrons["valid"] & np.isin(origin, (1, 2, 3))).any(1)
    assert ratio[semileptonic].mean() > ratio[~semileptonic].mean() + 0.1
    pdg = jets["HadronGhostInitialTruthLabelPdgId"]
    assert (np.abs(pdg[jets["flavour_label"] == 2]) == 0).all()
    lead_from_b = electrons["valid"][:, 0] & (origin[:, 0] == 1)
    # the electron's sign is the b quark's: a negative meson ID or a positive baryon ID
    quark = np.where(np.isin(np.abs(pdg), (5122, 4122)), -np.sign(pdg), np.sign(pdg))
    assert (quark[lead_from_b] == np.sign(electrons["qOverP"][lead_from_b, 0])).all()
    kind = np.abs(tracks["ftagTruthTypeLabel"])
    real = tracks["valid"]
    from_c = real & (tracks["ftagTruthOriginLabel"] == 5)
    primary = real & (tracks["ftagTruthOriginLabel"] == 2)
    assert (kind[from_c] == 3).mean() > 2 * (kind[primary] == 3).mean()
    assert (tracks["ftagTruthTypeLabel"][~real] == -1).all()
