"""Shared fixtures: real FTAG-layout HDF5 files written by the tests, small real disks, the
model x attention x pooling matrix, and one trained run per session."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import salt.schema  # noqa: F401  (the config schemas, for tests that compose with Hydra)
from salt.models import Tagger, build_tagger

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the cores: one torch thread each, here and in the processes the tests
    # start. Several multi-threaded workers on 2 cores spin against each other and made the
    # suite slower in parallel (462 s) than alone (274 s); with one thread each it takes 177 s.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRACK_VARS = ["d0", "z0SinTheta", "numberOfPixelHits"]
JET_VARS = ["pt_btagJes", "eta_btagJes"]
TASKS = ("jet_classification", "track_origin", "track_vertexing")


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


@contextlib.contextmanager
def held_open_for_writing(path: Path) -> Iterator[None]:
    """Another process holds ``path`` open in HDF5 write mode (with its file lock) until the
    block ends: what a preprocessing job still writing the file looks like."""
    code = (
        "import sys, h5py; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); "
        "sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the writer closes the file and ends
        proc.wait(timeout=30)


NOBODY = 65534


def run_as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` as the unprivileged user nobody (root reads any file whatever
    its mode, so a permission error needs another user); skipped where that cannot run."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a check as another user")
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [*cmd, sys.executable, "-c", code, *args],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )
    # 126/127: setpriv could not run Python as nobody (e.g. under a home directory of mode 700)
    if out.returncode in (126, 127) or "No module named 'salt'" in out.stderr:
        pytest.skip(f"the user nobody cannot run this Python with salt: {out.stderr.strip()}")
    return out


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


def fill_disk(disk: Path, leave: int) -> Path:
    """Fill the file system of ``disk`` (another job's output, say) until about ``leave``
    bytes are free; returns the filler file, to remove when the test frees the space."""
    filler = disk / "other_job_output.bin"
    free = shutil.disk_usage(disk).free
    with filler.open("ab") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


@contextlib.contextmanager
def read_only_view(source: Path, mount_point: Path) -> Iterator[Path]:
    """``source`` seen through a read-only bind mount at ``mount_point``: tests run as root,
    where chmod does not stop writes (needs root: the test is skipped otherwise)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    bind = subprocess.run(
        ["mount", "--bind", str(source), str(mount_point)], capture_output=True, text=True
    )
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.strip()}")
    try:
        ro = subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(mount_point)], capture_output=True, text=True
        )
        if ro.returncode != 0:
            pytest.skip(f"cannot make a bind mount read-only here: {ro.stderr.strip()}")
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# ---- the model x attention x pooling matrix ---------------------------------------------------
def _options(group: str) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in (CONF / group).glob("*.yaml")))


MODELS = _options("model")  # GN1, GN2, GN2Cat
ATTENTIONS = _options("attention")  # gatv2, scaled_dot_product
POOLINGS = _options("pooling")  # cross_attention, global_attention
# What a command line can choose: a model, and an attention and a pooling group or none (null:
# the model's own). test_models_configs checks that every choice composes as `model_cfg` merges
# it, and that leaving a group out is the model's own choice, i.e. one of MATRIX.
CHOICES = list(itertools.product(MODELS, (None, *ATTENTIONS), (None, *POOLINGS)))
# The distinct models those choices build: each is built and trained once (test_models_configs).
MATRIX = list(itertools.product(MODELS, ATTENTIONS, POOLINGS))
# Encoder attention x pooling, for the properties tested on GN2Cat (GN2 plus the global inputs
# concatenated after the encoder): padding and permutation symmetry, every attention backend.
ENCODER_POOLING = list(itertools.product(ATTENTIONS, POOLINGS))


def combo_id(combo: tuple) -> str:
    return "-".join(str(c) for c in combo)


def group_overrides(model: str, attention: str | None, pooling: str | None) -> list[str]:
    """The command line's group choices for a combination (None: the group left out)."""
    out = [f"model={model}"]
    if attention:
        out.append(f"attention={attention}")
    if pooling:
        out.append(f"pooling={pooling}")
    return out


def model_cfg(
    name: str = "GN2",
    attention: str | None = None,
    pooling: str | None = None,
    class_weights: bool = False,
):
    """The model node as Hydra composes it: the model file (with its defaults), then the
    attention and pooling group files merged into its attention and pooling nodes.

    Without `class_weights`, tasks use no class weights, so the tagger builds without a
    class_dict (class weights are tested on their own, test_class_weights_*)."""

    def load(group: str, option: str):
        node = OmegaConf.load(CONF / group / f"{option}.yaml")
        defaults = node.pop("defaults", None) or ["_self_"]
        merged = OmegaConf.create()
        for entry in defaults:
            merged = OmegaConf.merge(merged, node if entry == "_self_" else load(group, entry))
        return merged

    cfg = load("model", name)
    if attention:
        cfg.attention = OmegaConf.merge(cfg.attention, load("attention", attention))
    if pooling:
        cfg.pooling = OmegaConf.merge(cfg.pooling, load("pooling", pooling))
    for task in cfg.tasks.values():
        if "use_class_weights" in task and not class_weights:
            task.use_class_weights = False
    return cfg


def uniform_class_dict(cfg) -> dict:
    """A class_dict with weight 1 for every class of every task that uses class weights."""
    out: dict = {}
    for task in cfg.tasks.values():
        if task.get("use_class_weights"):
            out.setdefault(task.input, {})[task.label] = [1.0] * len(task.class_names)
    return out


@pytest.fixture(scope="session", params=ENCODER_POOLING, ids=combo_id)
def gn2cat_tagger(request: pytest.FixtureRequest) -> Tagger:
    """GN2Cat with each encoder attention and pooling, seeded, in eval mode; built once per
    session for test_models_tagger and test_models_fast_path. Shared: copy it to change it."""
    torch.manual_seed(0)
    return build_tagger(model_cfg("GN2Cat", *request.param)).eval()


# ---- one trained run per session --------------------------------------------------------------
SAMPLE_JETS = 3000  # training jets of the built-in sample (seed 42); val and test: 750 each
# GN2 shrunk, 2 epochs of 30 steps; a metrics row every step and a checkpoint every 10 steps
# (the crash tests kill it at a logged step and resume it to the same weights)
TRAINED_RUN = [
    "force=true",
    "trainer.progress_bar=false",
    f"data.sample.num_jets={SAMPLE_JETS}",
    "data.batch_size=100",
    "data.num_workers=0",
    "trainer.max_epochs=2",
    "trainer.ckpt_every_n_steps=10",
    "logger=local",
    "logger.log_every_n_steps=1",
    "logger.plots=false",
    "model.embed_dim=32",
    "model.init_net.hidden_layers=[32]",
    "model.encoder.num_layers=1",
    "model.encoder.out_dim=32",
    "model.attention.num_heads=2",
    *[f"model.tasks.{t}.hidden_layers=[32]" for t in TASKS],
]
TRAINED_RUN_STEPS = 60  # 30 per epoch


def logged_step(run_dir: Path) -> int:
    """The last training step whose metrics row reached the run's metrics file (the local
    logger flushes every row)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row being written
        if "train/loss" in row:
            steps.append(int(row["step"]))
    return max(steps)


@dataclass(frozen=True)
class TrainedRun:
    """The session's trained run. Read it, never change it: `copy_run` for a test that writes
    into a run directory (its teardown fails the session if a file of it changed)."""

    run_dir: Path
    cache: Path  # data.sample.dir
    sample: Path  # the `sample` fixture's directory, under cache

    @property
    def overrides(self) -> list[str]:
        """The run's command line, without log_dir."""
        return [*TRAINED_RUN, f"data.sample.dir={self.cache}"]

    @property
    def test_file(self) -> Path:
        return self.sample / "test.h5"

    def compose(self, log_dir: Path, *extra: str):
        """Its config, as composed for `train`, writing under ``log_dir``."""
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            return compose("train", overrides=[*self.overrides, f"log_dir={log_dir}", *extra])


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of ``run_dir`` under ``dest`` (same name)."""
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(run_dir, dest / run_dir.name))


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data.sample.dir for the session's runs: each sample size is written there once."""
    return tmp_path_factory.mktemp("sample_cache")


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under ``roots``: what a shared run must keep."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for root in roots
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="session")
def sample(sample_cache: Path) -> Iterator[Path]:
    """The built-in sample of the trained run (SAMPLE_JETS training jets, seed 42), read only:
    train.h5, val.h5, test.h5, norm_dict.yaml, class_dict.yaml."""
    from salt.data.build import ensure_sample

    path = ensure_sample(sample_cache, SAMPLE_JETS, 42)
    before = snapshot(path)
    yield path
    assert snapshot(path) == before, "a test changed the session's sample"


@pytest.fixture(scope="session")
def trained_run(
    tmp_path_factory: pytest.TempPathFactory, sample_cache: Path, sample: Path
) -> Iterator[TrainedRun]:
    """GN2 (shrunk) trained 2 epochs on the session's sample, once for the tests that need a
    trained run: evaluation, export, crash and resume tests."""
    from salt.train import train

    logs = tmp_path_factory.mktemp("trained_run") / "logs"
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "train", overrides=[*TRAINED_RUN, f"data.sample.dir={sample_cache}", f"log_dir={logs}"]
        )
    train(cfg)
    (run_dir,) = logs.iterdir()
    before = snapshot(logs)
    yield TrainedRun(run_dir, sample_cache, sample)
    assert snapshot(logs) == before, "a test changed the shared trained run: copy_run it"


@dataclass(frozen=True)
class EvaluatedRun:
    run_dir: Path  # a copy of the trained run: evaluations write their outputs into it
    result: Any  # salt.evaluate's result for it: predictions file (with tracks), performance


@pytest.fixture(scope="session")
def evaluated_run(
    trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory
) -> EvaluatedRun:
    """The default evaluation of (a copy of) the trained run, with track outputs: for the
    evaluation tests and the ONNX parity with the predictions file."""
    from salt.evaluate import evaluate

    run_dir = copy_run(trained_run.run_dir, tmp_path_factory.mktemp("evaluated"))
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "evaluate", overrides=[f"run_dir={run_dir}", "progress_bar=false", "write_tracks=true"]
        )
    return EvaluatedRun(run_dir, evaluate(cfg))


def entry_point_error(fn, cfg, capsys: pytest.CaptureFixture[str]) -> str:
    """What a command prints when ``fn(cfg)`` fails as a command runs it (`run_entry_point`):
    exit status 1 and no traceback; returns the captured stderr."""
    from salt.errors import run_entry_point

    with pytest.raises(SystemExit) as stop:
        run_entry_point(fn, cfg)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The local Slurm cluster is one node with this machine's cores: jobs of two slurm tests at
    # once would wait for each other past their time limits. One xdist worker runs them in turn.
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
