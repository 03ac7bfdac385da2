"""From the ``data`` config to files and loaders: the built-in sample, paths, workers."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salt.data.dataset import BatchLoader, H5BatchDataset, expand_files
from salt.data.ftag import DataError, LabelsConfig

SAMPLE_FILES = ("train.h5", "val.h5", "test.h5", "norm_dict.yaml", "class_dict.yaml")


@dataclass(frozen=True)
class DataFiles:
    train: list[Path]
    val: list[Path]
    test: list[Path] | None
    norm_dict: Path
    class_dict: Path | None


def ensure_sample(root: str | Path, num_jets: int, seed: int) -> Path:
    """The built-in sample under ``root``, written once; concurrent callers do not collide."""
    from salt.data.sample import write_sample  # only needed when the sample is used

    target = Path(root).expanduser() / f"{num_jets}jets_seed{seed}"
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
    if value is None:
        return None
    items = [value] if isinstance(value, str | os.PathLike) else list(value)
    files = expand_files(items)
    for f in files:
        if not f.exists():
            raise DataError(f"{f}: file not found (data.{key}).")
    return files


def resolve_files(data_cfg: Mapping[str, Any]) -> DataFiles:
    """Paths of the train/val/test files and dicts; the built-in sample when none is set."""
    if data_cfg.get("train_file") is None:
        sample = data_cfg.get("sample")
        if not sample:
            raise DataError("data.train_file is not set (and data.sample is not configured).")
        root = ensure_sample(sample["dir"], int(sample["num_jets"]), int(sample["seed"]))
        defaults = {
            "train_file": root / "train.h5",
            "val_file": root / "val.h5",
            "test_file": root / "test.h5",
            "norm_dict": root / "norm_dict.yaml",
            "class_dict": root / "class_dict.yaml",
        }
        data_cfg = {**defaults, **{k: v for k, v in data_cfg.items() if v is not None}}
    train = _files(data_cfg["train_file"], "train_file")
    assert train is not None
    val = _files(data_cfg.get("val_file"), "val_file")
    if val is None:
        raise DataError("data.val_file is not set: validation needs its own file.")
    beside = train[0].parent
    norm = Path(data_cfg.get("norm_dict") or beside / "norm_dict.yaml")
    if not norm.exists():
        raise DataError(f"{norm}: norm_dict not found (data.norm_dict).")
    cdict = data_cfg.get("class_dict")
    cdict = Path(cdict) if cdict else (beside / "class_dict.yaml")
    return DataFiles(
        train,
        val,
        _files(data_cfg.get("test_file"), "test_file"),
        norm,
        cdict if cdict.exists() else None,
    )


def make_loader(
    data_cfg: Mapping[str, Any],
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
    dataset = H5BatchDataset(
        files,
        variables=variables,
        norm_dict=norm_dict,
        labels=labels,
        batch_size=int(data_cfg["batch_size"]),
        num_jets=num_jets,
        num_jets_key=num_jets_key or ("data.num_train" if train else "data.num_val"),
        shuffle=train,
        drop_last=train,
        seed=seed,
        chunk_batches=int(data_cfg.get("chunk_batches", 10)),
        trim_tracks=bool(data_cfg.get("trim_tracks", True)),
        nan_policy=str(data_cfg.get("nan_policy", "error")),
        input_map=data_cfg.get("input_map"),
        rank=rank,
        world_size=world_size,
    )
    workers = int(data_cfg.get("num_workers", 0)) if num_workers is None else num_workers
    return BatchLoader(
        dataset,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=bool(data_cfg.get("persistent_workers", False)),
        prefetch_factor=data_cfg.get("prefetch_factor"),
    )


TRUTH_NAMES = ("HadronConeExclTruthLabelID", "flavour_label")
TRUTH_PREFIXES = ("ftagTruth", "truth")


def check_no_truth_inputs(
    variables: Mapping[str, Sequence[str]],
    labels: Mapping[str, Mapping[str, Any]],
    allowed: Sequence[str] = (),
) -> None:
    """Refuse truth information among the inputs: a tagger that sees its labels learns nothing.

    Truth means a label of any task, a known truth label, or a name starting with
    ``ftagTruth``/``truth``; names listed in ``data.allow_truth_inputs`` pass.
    """
    task_labels = {name for group in labels.values() for name in group}
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
