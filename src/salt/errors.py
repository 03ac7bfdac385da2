"""Every exception type of salt, and how a command reports them.

The errors a user can cause and fix (bad data, config, checkout, checkpoint) are reported as
one clear message without a traceback (``debug=true`` shows it). This module imports nothing
from the rest of the package, so every other module may import it: dependencies point down.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf.errors import OmegaConfBaseException


class DataError(ValueError):
    """Bad input data or data configuration; the message names the file, key and expectation."""


class StagingError(DataError):
    """The data cannot be staged (no space, unreadable file, unusable temp root)."""


class ConfigError(ValueError):
    """An inconsistent or invalid configuration; the message names the key path."""


# one type for every config mistake; the names say where it was found
ModelConfigError = ConfigError
LoggerConfigError = ConfigError


class ProvenanceError(RuntimeError):
    """Git state could not be read or acted on."""


class DirtyCheckoutError(ProvenanceError):
    """The salt checkout has uncommitted changes and ``force`` was not set."""


class TagError(ProvenanceError):
    """A run tag could not be created or pushed."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, or is not a salt checkpoint."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (the previous file at the path is unchanged)."""


class RankFailedError(RuntimeError):
    """A process started by `spawn` failed; ``rank`` says which. ``reported``: it printed its
    own error already."""

    def __init__(self, rank: int, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.rank = rank
        self.reported = reported


class SlurmError(RuntimeError):
    """Slurm refused a sweep's jobs, or they can never start; the message says what Slurm said
    and which ``hydra.launcher.*`` key to change."""


class OutputWriteError(RuntimeError):
    """An output of a command (predictions, performance, plot, ONNX model) could not be
    written; nothing is left under its name and earlier outputs are unchanged."""


class RankTimeoutError(RankFailedError):
    """A collective operation (DDP) failed: ``rank`` is the rank it waited for (stuck, dead or
    out of step), named in the message."""


class ExportError(RuntimeError):
    """The model could not be exported, or the exported model disagrees with torch."""


class StagingInterrupted(BaseException):  # like KeyboardInterrupt: no `except Exception`
    """A signal stopped the staging; the copies are already removed."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.reported = False  # as Interrupted's
        name = signal.Signals(self.signum).name
        super().__init__(f"data staging stopped by {name}; the copies were removed")


class SampleInterrupted(Exception):
    """The command line got SIGINT or SIGTERM: stop between blocks, remove partial files."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says where and why."""


class Interrupted(Exception):
    """A signal stopped the command; the message says what was kept and how to continue.
    ``reported``: another process (rank 0, a spawned rank) printed it already."""

    def __init__(self, signum: int, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.reported = reported


# salt writes every file it keeps atomically (salt.utils.atomic), so a Ctrl-C leaves none half
# written
INTERRUPTED = "salt: interrupted; no file was left half-written: run the command again"

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# what a command that failed on a full disk says to do next: training continues from its
# last checkpoint; a command that writes its outputs all at once is simply run again
RESUME_ADVICE = "continue from the run's last checkpoint with resume=<run dir>"
RERUN_ADVICE = "run the same command again"

# HDF5 reports a failed write as an error whose errno is only in the message text
_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")


def os_errno(err: BaseException) -> int | None:
    """The errno behind ``err``: its own, one in its chain (a library that wraps the
    OSError), or one HDF5 wrote into the message (``errno = 28``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        found = _ERRNO_IN_TEXT.search(str(current))
        if found:
            return int(found.group(1))
        if "No space left on device" in str(current):
            return errno.ENOSPC
        current = current.__cause__ or current.__context__
    return None


def existing_parent(path: object) -> Path:
    """``path``, or the nearest of its parents that exists (where it would be made)."""
    path = Path(str(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(directory: object) -> str:
    """``12.3 MiB free`` in ``directory`` (its nearest existing parent), for messages."""
    try:
        free = shutil.disk_usage(existing_parent(directory)).free
    except OSError:
        return "unknown free space"
    mib = free / 2**20
    return f"{mib:.1f} MiB free" if mib >= 1 else f"{mib:.2f} MiB free"  # 0.0 would say none


def write_failure(path: object, err: BaseException, elsewhere: str = "") -> str:
    """One line for an output ``path`` that could not be written: the file, the reason, what
    it needs and what to do. ``elsewhere``: how this command writes to another place."""
    path = Path(str(path))
    directory = existing_parent(path.parent)  # the output's directory was to be made in there
    code = os_errno(err)
    # the system's words for a known errno, not a library's wrapping of them (HDF5's are long)
    reason = os.strerror(code) if code is not None else " ".join(str(err).split())
    head = f"could not write {path}: {reason}"
    kept = "nothing was written (earlier results unchanged)"
    if code in DISK_FULL:
        return (
            f"{head}; {free_space(directory)} in {directory}; {kept}. Free space (or raise "
            f"the quota) and {RERUN_ADVICE}."
        )
    if code in NOT_WRITABLE:
        other = f", or {elsewhere}" if elsewhere else ""
        return (
            f"{head}; salt needs write permission in {directory} (on a writable file "
            f"system); {kept}. Make it writable{other}."
        )
    return f"{head}; {kept}. Once {directory} can be written, {RERUN_ADVICE}."


USER_ERRORS: tuple[type[BaseException], ...] = (
    DataError,
    ProvenanceError,
    CheckpointError,
    ConfigError,
    TrainingError,
    OmegaConfBaseException,
    FileNotFoundError,
    RankFailedError,
    SlurmError,
    OutputWriteError,
)


def run_entry_point(
    fn: Callable[[Any], Any],
    cfg: Any,
    extra_errors: tuple[type[BaseException], ...] = (),
    disk_full_advice: str = RESUME_ADVICE,
) -> None:
    """Run a command's body: a user error is one line on stderr and exit 1 (``debug=true``
    re-raises it with its traceback); a stop by signal, Ctrl-C included, is one line (what was
    kept) and exits 128 + the signal number. ``disk_full_advice``: what to do after a full disk
    the command did not report itself."""
    try:
        fn(cfg)
    except (Interrupted, StagingInterrupted) as err:
        if not getattr(err, "reported", False):
            print(f"salt: {err}", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:
        # Ctrl-C where the command has nothing more precise to say (it raises Interrupted)
        if cfg.get("debug"):
            raise
        print(INTERRUPTED, file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    except (*USER_ERRORS, *extra_errors) as err:
        if cfg.get("debug"):
            raise
        if not getattr(err, "reported", False):  # a DDP rank printed it already
            print(f"salt: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except OSError as err:
        # a full disk or quota while writing logs, plots or copies: the user's to fix
        if os_errno(err) not in DISK_FULL or cfg.get("debug"):
            raise
        where = f"{err.filename}: " if err.filename else ""
        space = f"{free_space(err.filename)} there; " if err.filename else ""
        reason = err.strerror or " ".join(str(err).split())
        print(
            f"salt: error: {where}{reason}; {space}free space (or raise the quota) and "
            f"{disk_full_advice}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
