"""Atomic file writes: a file under its final name is always complete.

Everything salt writes that a later run reads back (checkpoints, ``metadata.yaml``, configs)
goes through `atomic_path`: the data is written to a temporary file in the same directory,
flushed to disk, and renamed over the final name. A crash, a full disk or a Slurm kill at any
moment leaves either the previous file or the new one, never a half-written one. Temporary
files are named ``.<name>.tmp-<pid>-<random>`` so readers can skip leftovers by name
(`is_temp_name`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_yaml",
    "is_temp_name",
    "temp_name",
]

_TEMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")


def temp_name(name: str) -> str:
    """Name of a fresh temporary file for the final file name ``name``."""
    return f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file left by `atomic_path` (e.g. after a crash)."""
    return _TEMP_RE.match(name) is not None


def _fsync_path(path: Path) -> None:
    # fsync needs a file descriptor; read-only is enough on Linux for files and directories.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path`` atomically.

    The caller creates and writes the yielded file. On leaving the block without an
    exception the file is fsynced, renamed over ``path`` and the directory is fsynced (so the
    rename itself survives a power cut). On any exception, including KeyboardInterrupt and
    SystemExit, the temporary file is removed and ``path`` is left untouched. The parent
    directory is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temp_name(path.name)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(
                f"atomic write of {path}: the block did not create the temporary file {tmp}"
            )
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_yaml(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as YAML to ``path`` atomically.

    Uses ``yaml.safe_dump``, so only plain types (dict, list, str, numbers, bool, None) are
    accepted: anything else raises before the file is touched, and the file can be read back
    with ``yaml.safe_load`` anywhere.
    """
    try:
        text = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True)
    except yaml.representer.RepresenterError as err:
        raise TypeError(
            f"cannot write {path} as YAML: it holds a value of a non-plain type ({err}); "
            "convert it to str/int/float/bool/list/dict first"
        ) from err
    atomic_write_text(path, text)
