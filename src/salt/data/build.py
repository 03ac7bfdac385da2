"""From the ``data`` config to files and loaders: the built-in sample, paths, workers."""

from __future__ import annotations

import enum
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salt.data.dataset import BatchLoader, H5BatchDataset, expand_files
from salt.data.ftag import (
    DEFAULT_INPUT_MAP,
    DataError,
    LabelsConfig,
    ObjectOptions,
    load_yaml_dict,
    open_h5,
)
from salt.data.selections import parse_selections
from salt.errors import ConfigError
from salt.utils import typed_config as check

log = logging.getLogger("salt")


class NanPolicy(enum.StrEnum):
    error = "error"  # a non-finite input is an error naming the file and variable
    replace = "replace"  # non-finite inputs -> the variable's mean (0 after normalisation)


@dataclass
class SampleConfig:
    """`data.sample` (set by `data=sample`): the built-in sample, written once into `dir`."""

    num_jets: int = 24000
    seed: int = 42
    dir: str = "~/.cache/salt/sample"

    def check(self, where: str) -> None:
        check.positive(self.num_jets, f"{where}.num_jets")


@dataclass
class DataConfig:
    """The `data` node (conf/data/*.yaml): files, batches and loader settings."""

    train_file: Any = None  # a path, a glob, or a list of either
    val_file: Any = None
    test_file: Any = None
    norm_dict: str | None = None  # default: norm_dict.yaml beside the train file
    class_dict: str | None = None  # default: class_dict.yaml beside the train file
    input_map: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_INPUT_MAP))
    batch_size: int = 1000
    num_train: int = -1  # -1: all jets
    num_val: int = -1
    num_test: int = -1
    chunk_batches: int = 10  # batches read per contiguous chunk ("weak shuffling")
    trim_tracks: bool = True  # cut each batch to its longest jet
    num_inputs: dict[str, int] = field(default_factory=dict)  # per object type: first N stored
    selections: dict[str, list[str]] = field(default_factory=dict)  # e.g. {tracks: ["d0 < 3.5"]}
    # training-time augmentation: {type: {variable: std}} multiplies by N(1, std)
    noise: dict[str, dict[str, float]] = field(default_factory=dict)
    allow_truth_inputs: list[str] = field(default_factory=list)
    nan_policy: NanPolicy = NanPolicy.error
    num_workers: int | str = "auto"  # a count or auto
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    pin_memory: bool | str = "auto"  # auto: on GPU runs
    move_files_temp: str | None = None  # stage train/val there first (auto: Slurm's TMPDIR)
    sample: SampleConfig | None = None

    @classmethod
    def read(cls, node: DataConfig | Mapping[str, Any]) -> DataConfig:
        return check.read(cls, node, "data")

    def check(self, where: str) -> None:
        for key in ("train_file", "val_file", "test_file"):
            value = getattr(self, key)
            if isinstance(value, Sequence) and not isinstance(value, str):
                value = list(value)
                setattr(self, key, value)
            paths = value if isinstance(value, list) else [value]
            if value is not None and not (paths and all(isinstance(p, str) for p in paths)):
                raise ConfigError(
                    f"{where}.{key}: expected a path, a glob or a list of them, got {value!r}"
                )
        check.positive(self.batch_size, f"{where}.batch_size")
        for key in ("num_train", "num_val", "num_test"):
            value = getattr(self, key)
            if value == 0 or value < -1:
                raise ConfigError(
                    f"{where}.{key}={value}: expected -1 (all jets) or a positive count"
                )
        check.positive(self.chunk_batches, f"{where}.chunk_batches")
        if isinstance(self.num_workers, str) and self.num_workers != "auto":
            raise ConfigError(f"{where}.num_workers={self.num_workers!r}: expected auto or a count")
        if isinstance(self.num_workers, int):
            check.at_least(self.num_workers, f"{where}.num_workers", 0)
        check.positive(self.prefetch_factor, f"{where}.prefetch_factor", allow_none=True)
        if isinstance(self.pin_memory, str) and self.pin_memory != "auto":
            raise ConfigError(
                f"{where}.pin_memory={self.pin_memory!r}: expected auto, true or false"
            )
        if self.sample is not None:
            self.sample.check(f"{where}.sample")
        for input_type, count in self.num_inputs.items():
            check.positive(count, f"{where}.num_inputs.{input_type}")
        parse_selections(self.selections, f"{where}.selections")
        for input_type, per_var in self.noise.items():
            for var, std in per_var.items():
                if not std >= 0:
                    raise ConfigError(
                        f"{where}.noise.{input_type}.{var}={std}: expected a std >= 0"
                    )

    def object_options(self) -> ObjectOptions:
        """How the reader reads each object type (num_inputs, selections, noise)."""
        return ObjectOptions(
            num_inputs=dict(self.num_inputs),
            selections=parse_selections(self.selections),
            noise={k: dict(v) for k, v in self.noise.items()},
        )


SAMPLE_VERSION = 2
SAMPLE_FILES = ("train.h5", "val.h5", "test.h5", "norm_dict.yaml", "class_dict.yaml")


@dataclass(frozen=True)
class DataFiles:
    train: list[Path]
    val: list[Path]
    test: list[Path] | None
    norm_dict: Path
    class_dict: Path | None
    # why class_dict is None: the set (or default) path's problem, for `check_class_dict`
    class_dict_problem: str | None = None
    class_dict_given: bool = False  # data.class_dict was set (not the default beside the files)
    notes: tuple[str, ...] = ()  # warnings about the files, logged once by `warn_about_files`


def ensure_sample(root: str | Path, num_jets: int, seed: int) -> Path:
    """The built-in sample under ``root``, written once; concurrent callers do not collide."""
    from salt.data.sample import write_sample  # only needed when the sample is used

    # the version names what the files hold (v2: flows and electrons), so an older cache is
    # not taken for a newer sample
    target = Path(root).expanduser() / f"{num_jets}jets_seed{seed}_v{SAMPLE_VERSION}"
    if all((target / name).exists() for name in SAMPLE_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        print(f"salt: writing the built-in sample ({num_jets} training jets) to {target}")
        write_sample(tmp, num_jets, seed)
        try:
            tmp.rename(target)  # atomic: the directory appears complete or not at all
        except OSError:
            if not all((target / name).exists() for name in SAMPLE_FILES):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _files(value: Any, key: str) -> list[Path] | None:
    """The files of ``data.<key>``, each opened once here, so a missing, unreadable, locked or
    damaged file stops the run before anything is written or staged."""
    if value is None:
        return None
    items = [value] if isinstance(value, str | os.PathLike) else list(value)
    files = expand_files(items)
    for f in files:
        open_h5(f, f"data.{key}").close()
    return files


def _dict_file(given: Any, default: Path, what: str) -> tuple[Path, str | None]:
    """The path of a dict and its problem (None: a readable file); the default beside the
    train file when the key is not set."""
    path = Path(given) if given else default
    key = (
        f"data.{what}" if given else f"data.{what} not set: the default beside the first train file"
    )
    try:
        load_yaml_dict(path, what, key)  # read here too: a bad dict stops before staging
    except DataError as err:
        return path, str(err)
    return path, None


def resolve_files(data_cfg: DataConfig | Mapping[str, Any]) -> DataFiles:
    """Paths of the train/val/test files and dicts; the built-in sample when none is set."""
    data = DataConfig.read(data_cfg)
    paths: dict[str, Any] = {
        k: getattr(data, k)
        for k in ("train_file", "val_file", "test_file", "norm_dict", "class_dict")
    }
    if data.train_file is None:
        if data.sample is None:
            raise DataError("data.train_file is not set (and data.sample is not configured).")
        root = ensure_sample(data.sample.dir, data.sample.num_jets, data.sample.seed)
        defaults = {
            "train_file": root / "train.h5",
            "val_file": root / "val.h5",
            "test_file": root / "test.h5",
            "norm_dict": root / "norm_dict.yaml",
            "class_dict": root / "class_dict.yaml",
        }
        paths = {k: defaults[k] if v is None else v for k, v in paths.items()}
    train = _files(paths["train_file"], "train_file")
    assert train is not None
    val = _files(paths["val_file"], "val_file")
    if val is None:
        raise DataError("data.val_file is not set: validation needs its own file.")
    beside = train[0].parent
    norm, problem = _dict_file(paths["norm_dict"], beside / "norm_dict.yaml", "norm_dict")
    if problem:
        raise DataError(problem)
    cdict, cproblem = _dict_file(paths["class_dict"], beside / "class_dict.yaml", "class_dict")
    notes = []
    try:
        test = _files(paths["test_file"], "test_file")
    except DataError as err:  # training does not read it: the evaluation reports it
        test = None
        notes.append(f"{err} Training goes on without it; evaluation will need it.")
    return DataFiles(
        train,
        val,
        test,
        norm,
        None if cproblem else cdict,
        class_dict_problem=cproblem,
        class_dict_given=data.class_dict is not None,
        notes=tuple(notes),
    )


def check_class_dict(files: DataFiles, users: Sequence[str]) -> None:
    """A class_dict that cannot be read is an error naming its path when tasks (``users``) use
    class weights (`warn_about_files` warns when it was set but nothing needs it)."""
    if files.class_dict is not None or files.class_dict_problem is None or not users:
        return
    keys = [f"model.tasks.{t}.use_class_weights" for t in users]
    raise DataError(
        f"{files.class_dict_problem.rstrip('.')}; {' and '.join(keys)} "
        f"{'is' if len(keys) == 1 else 'are'} true and need{'s' if len(keys) == 1 else ''} its "
        f"weights: set data.class_dict to the class_dict file, or "
        f"{' '.join(k + '=false' for k in keys)}."
    )


def same_files(files: DataFiles) -> list[tuple[Path, Path]]:
    """(train, val) pairs that are one file: the same path after resolving links, or the same
    inode (a hard link, another mount of it)."""

    def ident(p: Path) -> tuple[int, int]:
        st = os.stat(p)
        return st.st_dev, st.st_ino

    train = {ident(p): p for p in files.train}
    return [(train[ident(v)], v) for v in files.val if ident(v) in train]


def warn_about_files(files: DataFiles, class_weights_used: bool) -> None:
    """Warnings about the files: readable but probably not what was meant, or not needed now
    (once per run: the main rank logs them)."""
    for note in files.notes:
        log.warning("salt: %s", note)
    if files.class_dict_problem and files.class_dict_given and not class_weights_used:
        log.warning(
            "salt: %s; no task uses class weights, so training goes on without it.",
            files.class_dict_problem.rstrip("."),
        )
    for train, val in same_files(files):
        log.warning(
            "salt: %s (data.val_file) is the training file %s (data.train_file): the validation "
            "loss is measured on training jets and will not show overfitting; use a separate "
            "validation file.",
            val,
            train,
        )


def make_loader(
    data_cfg: DataConfig | Mapping[str, Any],
    files: Sequence[Path],
    norm_dict: Path | Mapping,
    *,
    variables: Mapping[str, Sequence[str]],
    labels: LabelsConfig,
    num_jets: int,
    train: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    pin_memory: bool = False,
    num_jets_key: str | None = None,
) -> BatchLoader:
    """A loader for training (shuffled, full batches) or validation/test (in order, all jets).

    ``num_jets_key`` names the setting ``num_jets`` came from, for messages.
    """
    data = DataConfig.read(data_cfg)
    dataset = H5BatchDataset(
        files,
        variables=variables,
        norm_dict=norm_dict,
        labels=labels,
        batch_size=data.batch_size,
        num_jets=num_jets,
        num_jets_key=num_jets_key or ("data.num_train" if train else "data.num_val"),
        shuffle=train,
        drop_last=train,
        seed=seed,
        chunk_batches=data.chunk_batches,
        trim_tracks=data.trim_tracks,
        nan_policy=str(data.nan_policy),
        input_map=dict(data.input_map),
        rank=rank,
        world_size=world_size,
        options=data.object_options(),
    )
    if num_workers is None:
        num_workers = data.num_workers if isinstance(data.num_workers, int) else 0
    return BatchLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=data.persistent_workers,
        prefetch_factor=data.prefetch_factor,
    )


TRUTH_NAMES = ("HadronConeExclTruthLabelID", "flavour_label")
TRUTH_PREFIXES = ("ftagTruth", "truth")


def check_no_truth_inputs(
    variables: Mapping[str, Sequence[str]],
    labels: Mapping[str, Mapping[str, Any]],
    allowed: Sequence[str] = (),
) -> None:
    """Refuse truth information among the inputs: a tagger that sees its labels learns nothing.

    Truth means a label of any task (but one read beside the truth: ``LabelSpec.truth``), a
    known truth label, or a name starting with ``ftagTruth``/``truth``; names listed in
    ``data.allow_truth_inputs`` pass.
    """
    task_labels = {
        name
        for group in labels.values()
        for name, spec in group.items()
        if getattr(spec, "truth", True)
    }
    leaks = [
        f"{input_type}: {var}"
        for input_type, names in variables.items()
        for var in names
        if var not in allowed
        and (
            var in task_labels
            or var in TRUTH_NAMES
            or var.lower().startswith(tuple(p.lower() for p in TRUTH_PREFIXES))
        )
    ]
    if leaks:
        raise DataError(
            f"truth information among the model inputs (model.variables): {', '.join(leaks)}. "
            "Remove it, or list it in data.allow_truth_inputs if it is really meant as an input."
        )
