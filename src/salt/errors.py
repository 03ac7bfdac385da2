"""The errors a user can cause and fix (bad data, config, checkout, checkpoint): these are
reported as one clear message without a traceback (``debug=true`` shows it)."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from salt.data.ftag import DataError
from salt.models.config import ModelConfigError
from salt.provenance import ProvenanceError
from salt.tracking import LoggerConfigError
from salt.training.checkpoint import CheckpointError
from salt.training.distributed import RankFailedError


class ConfigError(ValueError):
    """An inconsistent or invalid run configuration."""


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
    ModelConfigError,
    ProvenanceError,
    LoggerConfigError,
    CheckpointError,
    ConfigError,
    TrainingError,
    OmegaConfBaseException,
    FileNotFoundError,
    RankFailedError,
)


def run_entry_point(
    fn: Callable[[Any], Any], cfg: Any, extra_errors: tuple[type[BaseException], ...] = ()
) -> None:
    """Run a command's body: a user error is one line on stderr and exit 1 (``debug=true``
    re-raises it with its traceback); a stop by signal exits 128 + the signal number."""
    from salt.data.staging import StagingInterrupted

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
