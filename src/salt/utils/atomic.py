"""Atomic file writes: a file under its final name is always complete.

Everything salt writes that a later run reads back (checkpoints, ``metadata.yaml``, configs)
goes through `atomic_path`: the data is written to a temporary file in the same directory,
flushed to disk, and renamed over the final name. A crash, a full disk or a Slurm kill at any
moment leaves either the previous file or the new one, never a half-written one. Temporary
files are named ``.<name>.tmp-<pid>-<random>`` so readers can skip leftovers by name
(`is_temp_name`).

A command's outputs that belong together (predictions, performance and plot of one
evaluation; an ONNX model) are written through an `OutputSet`: each under a temporary name,
all renamed into place at the end, so a failure leaves the earlier set as it was.
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

from salt.errors import OutputWriteError, write_failure

__all__ = [
    "OutputSet",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_yaml",
    "is_temp_name",
    "temp_name",
    "yaml_text",
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


def yaml_text(obj: Any, path: str | os.PathLike[str]) -> str:
    """``obj`` as YAML for the file ``path``, with ``yaml.safe_dump``: only plain types (dict,
    list, str, numbers, bool, None), so the file reads back with ``yaml.safe_load`` anywhere;
    anything else raises TypeError naming ``path``."""
    try:
        return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True)
    except yaml.representer.RepresenterError as err:
        raise TypeError(
            f"cannot write {path} as YAML: it holds a value of a non-plain type ({err}); "
            "convert it to str/int/float/bool/list/dict first"
        ) from err


def atomic_write_yaml(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as YAML to ``path`` atomically (`yaml_text`: a non-plain value raises
    before the file is touched)."""
    atomic_write_text(path, yaml_text(obj, path))


class OutputSet:
    """Output files that appear together or not at all.

    `file` yields a temporary name beside each final one to write; `commit` renames them all
    into place. Leaving the ``with`` block without `commit` (an exception, a signal) removes
    every temporary file, so the final names keep what they held before: an earlier result,
    or nothing. A write that fails with an OSError (full disk, quota, read-only file system,
    no permission) is raised as `OutputWriteError`: one line naming the final file, the free
    space and what to do; ``elsewhere`` says how the command writes to another place.
    """

    def __init__(self, elsewhere: str = "") -> None:
        self.elsewhere = elsewhere
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final)

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    @contextlib.contextmanager
    def reporting(self, path: str | os.PathLike[str]) -> Iterator[None]:
        """Report an OSError inside the block as a failed write of the output ``path``."""
        try:
            yield
        except OSError as err:
            self.discard()  # first: the message gives the free space without the partial files
            raise OutputWriteError(write_failure(path, err, self.elsewhere)) from err

    def check_writable(self, path: str | os.PathLike[str]) -> None:
        """Create the directory of the output ``path`` if needed and a file in it, before
        any long work: a place salt cannot write is reported at once, not at the end."""
        path = Path(path)
        probe = path.parent / temp_name(path.name)
        with self.reporting(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            probe.touch()
            probe.unlink()

    @contextlib.contextmanager
    def file(self, path: str | os.PathLike[str]) -> Iterator[Path]:
        """A temporary path to write the output ``path`` to (the caller creates the file)."""
        path = Path(path)
        tmp = path.parent / temp_name(path.name)
        self._pending.append((tmp, path))
        with self.reporting(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{path}: the writer did not create {tmp}")

    def commit(self, remove: tuple[Path, ...] | list[Path] = ()) -> None:
        """Put every file in place (fsynced, then renamed); ``remove``: earlier outputs of
        the same set that this one has not (e.g. a plot this evaluation could not make)."""
        for tmp, path in self._pending:
            with self.reporting(path):
                _fsync_path(tmp)
        for tmp, path in self._pending:
            with self.reporting(path):
                os.replace(tmp, path)
        for stale in remove:
            with self.reporting(stale):
                Path(stale).unlink(missing_ok=True)
        for directory in {path.parent for _, path in self._pending}:
            # the files are in place: a directory that cannot be synced (some network file
            # systems) only leaves the renames less safe against a power cut
            with contextlib.suppress(OSError):
                _fsync_path(directory)
        self._pending.clear()

    def discard(self) -> None:
        """Remove the temporary files not yet committed."""
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self._pending.clear()
