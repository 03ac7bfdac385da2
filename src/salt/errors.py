"""Every exception type of salt, and how a command reports them.

The errors a user can cause and fix (bad data, config, checkout, checkpoint) are reported as
one clear message without a traceback (``debug=true`` shows it). This module imports nothing
from the rest of the package, so every other module may import it: dependencies point down.
"""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Callable
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


class ExportError(RuntimeError):
    """The model could not be exported, or the exported model disagrees with torch."""


class StagingInterrupted(BaseException):  # like KeyboardInterrupt: no `except Exception`
    """A signal stopped the staging; the copies are already removed."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
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
    """Training stopped by a signal after saving its state; resume continues it."""

    def __init__(self, signum: int, step: int, run_dir: object) -> None:
        self.signum, self.step = int(signum), step
        where = f" with resume={run_dir}" if run_dir else ""
        super().__init__(
            f"stopped by signal {self.signum} at step {step}; state saved, continue{where}"
        )


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

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
)


def run_entry_point(
    fn: Callable[[Any], Any], cfg: Any, extra_errors: tuple[type[BaseException], ...] = ()
) -> None:
    """Run a command's body: a user error is one line on stderr and exit 1 (``debug=true``
    re-raises it with its traceback); a stop by signal exits 128 + the signal number."""
    try:
        fn(cfg)
    except (Interrupted, StagingInterrupted) as err:
        print(f"salt: {err}", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
    except (*USER_ERRORS, *extra_errors) as err:
        if cfg.get("debug"):
            raise
        if not getattr(err, "reported", False):  # a DDP rank printed it already
            print(f"salt: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except OSError as err:
        # a full disk or quota while writing logs, plots or copies: the user's to fix
        if err.errno not in DISK_FULL or cfg.get("debug"):
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(
            f"salt: error: {where}{err.strerror}; free space (or raise the quota) and continue "
            "from the run's last checkpoint with resume=<run dir>",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
