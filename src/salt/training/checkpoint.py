"""Checkpoint files: atomic save, safe load, RNG state, names and lookup.

A checkpoint is one dict written with ``torch.save``::

    {"salt_checkpoint": 1, "model": ..., "optimizer": ..., "scheduler": ..., "scaler": ...,
     "data": ..., "rng": rng_state(), "counters": {"epoch": ..., "step": ...},
     "config": {...}, "logger": ...}

The caller builds the dict; this module adds the format marker, checks that every value is
of a type ``torch.load(weights_only=True)`` can read back (so a problem shows at the first
save, not at the resume days later), and writes it atomically. Loading uses
``weights_only=True``, so a checkpoint file cannot run code.

Files in a checkpoint directory: ``last.ckpt`` (the most recent state) and
``epoch=003-val_loss=0.61234.ckpt`` (end of an epoch, named by the monitored validation loss;
another monitored metric names it instead, ``epoch=003-val_light_rej_70=87.40000.ckpt``:
salt.training.monitor). Every file under one of these names was
written atomically and is therefore complete; leftovers of interrupted writes have temporary
names (``.last.ckpt.tmp-<pid>-<hex>``) and are ignored.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salt.errors import CheckpointError, CheckpointWriteError, free_space
from salt.utils.atomic import atomic_path, is_temp_name

__all__ = [
    "FORMAT_VERSION",
    "LAST",
    "LOSS_KEY",
    "MARKER",
    "CheckpointError",
    "CheckpointWriteError",
    "best_checkpoint",
    "checkpoint_name",
    "latest_checkpoint",
    "load_checkpoint",
    "parse_checkpoint_name",
    "remove_temp_files",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

MARKER = "salt_checkpoint"
FORMAT_VERSION = 1
LAST = "last.ckpt"

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save has written zip archives since torch 1.6
LOSS_KEY = "val_loss"  # the name's metric key for every monitored loss, as the old tool's
_NAME_RE = re.compile(r"^epoch=(\d+)-([A-Za-z][A-Za-z0-9_]*)=([-+]?(?:\d+\.\d+|inf|nan))\.ckpt$")

# Types torch.load(weights_only=True) reads back without extra allow-listing (checked against
# torch 2.13). Exact types: subclasses (enums, namedtuples, defaultdict) are refused on load.
_LEAF_TYPES = (str, bytes, bytearray, int, float, complex, bool, type(None))
_TORCH_TYPES = (torch.Size, torch.dtype, torch.device)
_MAPPING_TYPES = (dict, collections.OrderedDict)
_SEQUENCE_TYPES = (list, tuple, set)


def _check_loadable(obj: Any, where: str) -> None:
    """Raise TypeError naming the entry if ``obj`` holds a type weights_only cannot load."""
    kind = type(obj)
    if kind in _LEAF_TYPES or kind in _TORCH_TYPES or isinstance(obj, torch.Tensor):
        return
    if kind in _MAPPING_TYPES:
        for key, value in obj.items():
            _check_loadable(key, f"{where} (a key)")
            _check_loadable(value, f"{where}.{key}" if where else str(key))
        return
    if kind in _SEQUENCE_TYPES:
        for i, value in enumerate(obj):
            _check_loadable(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint entry {where!r} has type {kind.__module__}.{kind.__qualname__}, which "
        "load_checkpoint (torch.load with weights_only=True) cannot read back; store tensors, "
        "numbers, strings, bools, None, and dicts/lists/tuples of those (e.g. numpy values as "
        "tensors or with .item()/.tolist())"
    )


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: torch's zip writer wraps a failed write in a RuntimeError
    ("unexpected pos ...") raised while closing, with the OSError as its context."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` atomically, adding the ``salt_checkpoint`` format marker.

    On any OSError (a full disk, a quota, a vanished mount) the temporary file is removed, the
    previous file at ``path`` stays intact, and `CheckpointWriteError` is raised. A value that
    could not be loaded back raises TypeError before anything is written.
    """
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    marker = state.get(MARKER, FORMAT_VERSION)
    if marker != FORMAT_VERSION:
        raise ValueError(
            f"save_checkpoint: state[{MARKER!r}] is {marker!r}, but this salt writes format "
            f"{FORMAT_VERSION}"
        )
    payload = {MARKER: FORMAT_VERSION, **{k: v for k, v in state.items() if k != MARKER}}
    _check_loadable(payload, "")
    path = Path(path)
    try:
        # A Python file object (not a path) so write errors surface as OSError with an errno;
        # torch's own file writer reports ENOSPC as an opaque RuntimeError.
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)
    except (OSError, RuntimeError) as err:
        os_error = _os_error_in(err)
        if os_error is None:
            raise
        raise CheckpointWriteError(
            f"could not write checkpoint {path}: {os_error.strerror or os_error} (errno "
            f"{os_error.errno}); {free_space(path.parent)} in {path.parent}; the previous "
            f"{path.name}, if any, is unchanged"
        ) from os_error


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a salt checkpoint with ``weights_only=True`` (a file cannot execute code).

    Raises `CheckpointError` for a missing file, a file that is not a torch file or is
    truncated or corrupt, a file holding Python objects beyond tensors and plain containers,
    and a torch file without the ``salt_checkpoint`` marker.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as err:
        raise CheckpointError(f"could not read checkpoint {path}: {err}") from err
    if head != _ZIP_MAGIC:
        # Not the zip archive torch.save writes: never hand it to the unpickler at all.
        raise CheckpointError(
            f"{path} is not a salt checkpoint or truncated: not a torch file (starts with {head!r})"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            detail = str(err).strip().splitlines()[-1]
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects other than tensors and "
                f"plain containers, which could run code when loaded ({detail})"
            ) from err
        raise CheckpointError(f"{path} is not a salt checkpoint or truncated: {err}") from err
    except Exception as err:  # torch reports corruption as RuntimeError, EOFError, KeyError...
        raise CheckpointError(
            f"{path} is not a salt checkpoint or truncated: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(obj, dict) or MARKER not in obj:
        found = f"keys {sorted(map(str, obj))[:10]}" if isinstance(obj, dict) else type(obj)
        raise CheckpointError(
            f"{path} is not a salt checkpoint: no {MARKER!r} marker (found {found})"
        )
    version = obj[MARKER]
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}; this salt reads formats 1 to "
            f"{FORMAT_VERSION} (written by a newer salt?)"
        )
    return obj


def rng_state() -> dict[str, Any]:
    """The states of python ``random``, numpy's global generator, and torch CPU and CUDA.

    Encoded with tensors, ints, floats and strings only, so it survives weights_only loading.
    In DDP each rank has its own state; this captures the calling process only.
    """
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):
        raise RuntimeError("numpy's global generator is not MT19937; cannot record its state")
    kind, keys, pos, has_gauss, cached_gaussian = np_state
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from a dict made by `rng_state`."""
    try:
        py, npy, cpu, cuda = state["python"], state["numpy"], state["torch"], state["cuda"]
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
        np.random.set_state(
            (
                npy["kind"],
                npy["key"].cpu().numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            )
        )
        torch.set_rng_state(cpu.cpu())
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not an RNG state made by rng_state(): {err!r}") from err
    if not cuda:
        return
    if not torch.cuda.is_available():
        logger.warning("the checkpoint holds CUDA RNG states but CUDA is not available now")
        return
    count = torch.cuda.device_count()
    if len(cuda) != count:
        logger.warning(
            "the checkpoint holds %d CUDA RNG states but %d devices are visible; restoring %d",
            len(cuda),
            count,
            min(len(cuda), count),
        )
    for device, device_state in enumerate(cuda[:count]):
        torch.cuda.set_rng_state(device_state.cpu(), device)


def checkpoint_name(epoch: int, val_loss: float, key: str = LOSS_KEY) -> str:
    """File name of an end-of-epoch checkpoint, e.g. ``epoch=003-val_loss=0.61234.ckpt``;
    ``key`` names the metric whose value it holds."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"checkpoint_name: epoch must be an integer >= 0, got {epoch!r}")
    return f"epoch={epoch:03d}-{key}={float(val_loss):.5f}.ckpt"


def parse_checkpoint_name(name: str, key: str | None = None) -> tuple[int, float] | None:
    """``(epoch, value)`` from a `checkpoint_name` (with metric ``key``, if given), or None
    for any other name."""
    match = _NAME_RE.match(name)
    if match is None or key not in (None, match.group(2)):
        return None
    return int(match.group(1)), float(match.group(3))


def _epoch_checkpoints(ckpt_dir: Path, key: str | None = None) -> list[tuple[int, float, Path]]:
    found = []
    for entry in ckpt_dir.iterdir():
        parsed = parse_checkpoint_name(entry.name, key)
        if parsed is not None and entry.is_file():
            found.append((*parsed, entry))
    return found


def remove_temp_files(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the leftovers of interrupted writes in ``ckpt_dir``; returns what was removed.

    Only for a directory no live process writes to (a requeued job's own run directory): a
    checkpoint write cut by a kill leaves a temporary file as large as a checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    removed = []
    for path in ckpt_dir.iterdir() if ckpt_dir.is_dir() else ():
        if is_temp_name(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("removed %d partial checkpoint file(s) in %s", len(removed), ckpt_dir)
    return removed


def latest_checkpoint(ckpt_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to resume from in ``ckpt_dir``, or None if there is none.

    ``last.ckpt`` if present, else the ``epoch=...`` file with the highest epoch. Files are
    not opened: every file under a final name was written atomically, so it is complete, and
    temporary leftovers of interrupted writes never match these names. Returns None when the
    directory does not exist.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    last = ckpt_dir / LAST
    if last.is_file():
        return last
    found = _epoch_checkpoints(ckpt_dir)
    if not found:
        return None
    return max(found, key=lambda c: (c[0], c[2].stat().st_mtime_ns))[2]


def best_checkpoint(
    ckpt_dir: str | os.PathLike[str], mode: str = "min", key: str = LOSS_KEY
) -> Path | None:
    """The ``epoch=...-<key>=...`` checkpoint with the lowest (``mode`` min) or highest (max)
    value in its name, or None. salt.training.monitor knows a run's key and mode.

    Non-finite values are never "best"; on a tie the earlier epoch wins.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"best_checkpoint: mode must be min or max, got {mode!r}")
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = [c for c in _epoch_checkpoints(ckpt_dir, key) if math.isfinite(c[1])]
    if not found:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(found, key=lambda c: (sign * c[1], c[0]))[2]
