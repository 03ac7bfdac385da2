"""A trained run, ready to predict: its config, the chosen checkpoint, the tagger and its dicts.

Shared by ``python -m salt.evaluate`` and ``python -m salt.export``. Everything but the test data
is read from the run directory: its config.yaml, its checkpoint (with the model config stored in
it) and its copy of the normalisation dict (training copies the one it used there), so a run
evaluates the same after the training files were edited or moved.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import ListConfig

from salt import models
from salt.data.build import DataConfig, resolve_files
from salt.data.dataset import expand_files
from salt.data.ftag import DataError, input_norm, load_yaml_dict, open_h5
from salt.errors import ConfigError
from salt.schema import TrainConfig, read_train_config
from salt.training import checkpoint as ckpt
from salt.training.monitor import best_checkpoint_of, no_best_checkpoint
from salt.training.run_dir import RUN_COPIES, load_run_config, run_copy

log = logging.getLogger("salt")


@dataclass
class LoadedRun:
    """A run directory with its tagger in eval mode on ``device``."""

    run_dir: Path
    cfg: TrainConfig  # the run's saved config.yaml
    ckpt_path: Path
    model_cfg: dict[str, Any]  # the model config the weights were trained with
    tagger: models.Tagger
    norm_dict: dict[str, Any]
    device: torch.device

    @property
    def name(self) -> str:
        """The model name (``model.name``): the prefix of every output name."""
        return self.tagger.name

    @property
    def variables(self) -> dict[str, list[str]]:
        """The input variable lists the tagger was built with (not read from the config again)."""
        return {k: list(v) for k, v in self.tagger.variables.items()}

    def data_config(self) -> DataConfig:
        """A copy of the run's data config, to change for an evaluation."""
        return copy.deepcopy(self.cfg.data)


def resolve_device(value: Any) -> torch.device:
    """``auto`` -> the first GPU if there is one, else the CPU; else the torch device named."""
    text = str(value)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"device={text!r}: expected auto, cpu, cuda or cuda:<index>.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={text}: CUDA is not available on this machine; use device=cpu.")
    return device


def choose_checkpoint(run_dir: Path, ckpt_path: Any) -> Path:
    """``ckpt_path`` if given, else the run's best checkpoint by the validation metric it
    monitored (``trainer.monitor``: by default the lowest jet-classification loss)."""
    if ckpt_path:
        path = Path(str(ckpt_path))
        if not path.is_file():
            raise ckpt.CheckpointError(f"ckpt_path={path}: checkpoint not found.")
        return path
    best = best_checkpoint_of(run_dir)
    if best is None:
        raise ckpt.CheckpointError(
            f"{no_best_checkpoint(run_dir)}; pass ckpt_path=... to choose one."
        )
    return best


def _norm_dict_of(run_dir: Path, cfg: TrainConfig) -> dict:
    """The run's ``norm_dict``: the run directory's copy, never the file it was copied from
    (it may have been edited or moved since)."""
    copy = run_copy(run_dir, "norm_dict", cfg.data.norm_dict)
    if copy is None:
        expected = run_dir / RUN_COPIES["norm_dict"]
        raise DataError(
            f"{expected}: norm_dict not found; training copies the norm_dict it used into the "
            "run directory, and evaluation and export read only that copy. Copy the norm_dict "
            f"this run was trained with ({cfg.data.norm_dict or 'see metadata.yaml'}) to "
            f"{expected}."
        )
    return load_yaml_dict(copy, "norm_dict")


def run_config(run_dir: Path) -> TrainConfig:
    """A run directory's saved config, read as a training config is; one clear error for a
    wrong directory or a config.yaml this version cannot read."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir}: no such directory.")
    try:
        return read_train_config(load_run_config(run_dir))
    except ConfigError as err:
        raise ConfigError(f"{run_dir / 'config.yaml'}: {err}") from None


def load_run(run_dir: str | Path, ckpt_path: Any = None, device: Any = "cpu") -> LoadedRun:
    """Load a run's config and checkpoint (default: the best by its monitored metric) and
    build its tagger, in eval mode on ``device``."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    path = choose_checkpoint(run_dir, ckpt_path)
    state = ckpt.load_checkpoint(path, map_location="cpu")
    # The checkpoint's own model config matches its weights, even when ckpt_path points to
    # another run; the run's config.yaml is the fallback.
    model_cfg = state.get("config") or cfg.model.plain()
    if not isinstance(model_cfg, dict):
        raise ckpt.CheckpointError(f"{path}: the stored model config is not a mapping.")
    norm_dict = _norm_dict_of(run_dir, cfg)
    norm = input_norm(norm_dict, cfg.data.input_map)  # model.edges un-normalises with it
    tagger = models.build_tagger(model_cfg, loss_weights=False, input_norm=norm)  # no loss
    try:
        tagger.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise ckpt.CheckpointError(
            f"{path}: the weights do not fit the model config stored with them: {err}"
        ) from None
    dev = resolve_device(device)
    tagger.to(dev).eval()
    log.info("salt: loaded %s (%s) on %s", path, tagger.name, dev)
    return LoadedRun(run_dir, cfg, path, model_cfg, tagger, norm_dict, dev)


def single_file(value: Any, key: str) -> Path:
    """One existing HDF5 file from a path, a glob or a list matching exactly one file."""
    many = isinstance(value, list | tuple | ListConfig)
    items = [str(v) for v in value] if many else [str(value)]
    files = expand_files(items)
    if len(files) != 1:
        raise ConfigError(
            f"{key}={value}: matches {len(files)} files; evaluate one file at a time (the "
            "output is named after it)."
        )
    open_h5(files[0], key).close()  # missing, a directory, unreadable, locked or damaged
    return files[0]


def resolve_test_file(run_data: DataConfig, given: Any) -> Path:
    """``data.test_file`` if given, else the run's test file (the built-in sample's for a run
    trained on it; the sample is written again if its cache was removed)."""
    if given:
        return single_file(given, "data.test_file")
    if run_data.test_file:
        return single_file(run_data.test_file, "data.test_file (from the run's config)")
    if run_data.train_file is None and run_data.sample is not None:
        files = resolve_files(run_data)
        if files.test:
            return files.test[0]
    raise ConfigError(
        "no test file: the run's config has no data.test_file; pass data.test_file=path/to/test.h5"
    )
