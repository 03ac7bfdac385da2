"""The run directory: its unique name, the merged config, metadata and copies of the dicts."""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from salt.errors import ConfigError, existing_parent
from salt.utils.atomic import atomic_path, atomic_write_text, atomic_write_yaml
from salt.utils.typed_config import as_plain

if TYPE_CHECKING:
    from salt.data.build import DataFiles
    from salt.schema import TrainConfig

# Keys of the saved config.yaml that make it a complete Hydra primary config on its own:
# `python -m salt.train --config-dir <run> --config-name config` trains again from it.
HYDRA_HEADER: dict[str, Any] = {
    "defaults": ["train_schema", {"override hydra/job_logging": "stdout"}, "_self_"],
    "hydra": {"output_subdir": None, "run": {"dir": "."}},
}


# The run's own copies of the dicts it was trained with, under these names whatever the
# originals are called. The saved config.yaml refers to them, and evaluation, export and resume
# read them, never the originals: those may be edited or moved after training.
RUN_COPIES = {"norm_dict": "norm_dict.yaml", "class_dict": "class_dict.yaml"}


def run_copy(run_dir: str | Path, key: str, configured: Any = None) -> Path | None:
    """The run directory's copy of its ``norm_dict`` or ``class_dict`` (``key``), or None.

    The file named in `RUN_COPIES`; else one named as the ``configured`` file: salt before
    these fixed names copied each dict under its original's name (``my_norms.yaml``).
    """
    run_dir = Path(run_dir)
    names = [RUN_COPIES[key]]
    if configured:
        names.append(Path(str(configured)).name)
    for name in names:
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def check_log_dir(log_dir: str) -> None:
    """Refuse a ``log_dir`` that cannot hold a run directory, before anything is written: the
    first part of the path that exists must be a writable directory on a writable file system.
    (Root passes permission checks, not a read-only mount: both are looked at.)"""
    existing = existing_parent(Path(log_dir).expanduser())
    if not existing.is_dir():
        raise ConfigError(
            f"log_dir={log_dir}: {existing} is not a directory; expected a directory (or a path "
            "that can be created) to hold the run directories."
        )
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        why = "is on a read-only file system"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = "is not writable by this user"
    else:
        return
    raise ConfigError(
        f"log_dir={log_dir}: {existing} {why}; expected a writable directory for the run "
        "directories (set log_dir=<a writable path>)."
    )


def create_run_dir(cfg: TrainConfig) -> Path:
    """``<log_dir>/<name>_<YYYYmmdd-HHMMSS>``, made unique (a suffix) if that name is taken."""
    root = Path(str(cfg.log_dir)).expanduser()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{cfg.name}_{stamp}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            path = root / (base if i == 0 else f"{base}_{i}")
            try:
                path.mkdir()  # atomic: two runs starting in the same second get different dirs
            except FileExistsError:
                continue
            (path / "ckpts").mkdir()
            return path
    except OSError as err:  # checked up front; this is what changed since (quota, a mount)
        raise ConfigError(
            f"log_dir={cfg.log_dir}: could not create a run directory in {root}: "
            f"{err.strerror or err}; expected a writable directory."
        ) from err
    raise ConfigError(f"log_dir={cfg.log_dir}: could not create a unique run directory for {base}")


def config_to_save(cfg: TrainConfig, copies: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """The full merged config, with run-specific keys reset so that it trains the run again;
    ``copies``: ``data.<key>`` -> the run directory's copy of that file, to use instead."""
    data = as_plain(cfg)
    data["ckpt_path"] = None
    data["resume"] = None
    for key, path in (copies or {}).items():
        data["data"][key] = str(path)
    return {**HYDRA_HEADER, **data}


def load_run_config(run_dir: str | Path) -> DictConfig:
    """A run's saved config.yaml, without the Hydra header, with ``data.norm_dict`` and
    ``data.class_dict`` pointing to the run directory's copies (`run_copy`), wherever the
    directory is now and whatever became of the originals."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.yaml; is {run_dir} a salt run directory?")
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    for key in HYDRA_HEADER:
        cfg.pop(key, None)
    data = OmegaConf.select(cfg, "data")  # the raw file: read by the schema later
    if isinstance(data, DictConfig):
        for key in RUN_COPIES:
            copy = run_copy(run_dir, key, OmegaConf.select(data, key))
            if copy is not None:
                data[key] = str(copy)
    return cfg


def write_run_files(run_dir: Path, cfg: TrainConfig, metadata: dict, files: DataFiles) -> None:
    """The run's config.yaml, metadata.yaml and copies of its dicts (`RUN_COPIES`)."""
    copies: dict[str, Path] = {}
    for key, src in (("norm_dict", files.norm_dict), ("class_dict", files.class_dict)):
        if src is not None:
            dest = run_dir / RUN_COPIES[key]
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
            copies[key] = dest.resolve()
    # after the copies: a config.yaml on disk always refers to files that exist
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(config_to_save(cfg, copies)))
    atomic_write_yaml(run_dir / "metadata.yaml", metadata)


def _job_key() -> str | None:
    """This Slurm job's identity, the same after a requeue (array tasks included)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def _job_marker(cfg: TrainConfig) -> Path | None:
    key = _job_key()
    return Path(str(cfg.log_dir)) / ".slurm_jobs" / key if key else None


def remember_job(cfg: TrainConfig, run_dir: Path) -> None:
    """Record which run directory this Slurm job writes, for its requeued self."""
    marker = _job_marker(cfg)
    if marker is not None:
        atomic_write_text(marker, str(run_dir.resolve()))


def requeued_run_dir(cfg: TrainConfig) -> Path | None:
    """The run directory of this job's previous attempt, when Slurm requeued it.

    Only a requeued job (``SLURM_RESTART_COUNT`` >= 1) continues in place; a new job, or a
    second run inside the same allocation, gets its own run directory.
    """
    marker = _job_marker(cfg)
    if marker is None or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    if not marker.exists():
        return None
    run_dir = Path(marker.read_text().strip())
    return run_dir if (run_dir / "config.yaml").exists() else None
