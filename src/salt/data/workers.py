"""DataLoader workers: how many (``data.num_workers``, ``auto``) and their options.

The CPUs a process may use are the fewest of: its CPU affinity (what Slurm's task binding,
``taskset`` or ``numactl`` allow), Slurm's ``SLURM_CPUS_PER_TASK`` / ``SLURM_CPUS_ON_NODE``,
and a cgroup CPU quota (containers, Kubernetes). ``os.cpu_count()`` counts the whole node and
would oversubscribe a shared one.

``num_workers=auto``:

* GPU run: the training process needs about one core to feed the GPU; the others read and
  prepare batches: ``min(cpus_per_rank - 1, 8)`` (beyond 8 workers the chunked HDF5 reads
  gain little and each worker holds its own chunk in memory).
* CPU run: the model's own threads use every core and workers would take them away; a
  worker or two only hides the file reads: 0 below 4 CPUs per rank, then
  ``min(cpus_per_rank // 4, 2)``.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from salt.data.ftag import DataError

if TYPE_CHECKING:
    from salt.data.build import DataConfig

__all__ = [
    "NumWorkersWarning",
    "available_cpus",
    "cpu_limits",
    "die_with_parent",
    "loader_options",
    "resolve_num_workers",
]

log = logging.getLogger("salt")

MAX_AUTO_WORKERS_GPU = 8
MAX_AUTO_WORKERS_CPU = 2
_SLURM_VARS = ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class NumWorkersWarning(UserWarning):
    """``data.num_workers`` is likely to slow training down on this machine."""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_quota() -> int | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cfs_quota_us``), if any."""
    candidates = ["/sys/fs/cgroup/cpu.max"]
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        if line.startswith("0::"):  # cgroup v2: this process's own group
            candidates.insert(0, f"/sys/fs/cgroup{line[3:].rstrip('/')}/cpu.max")
    quotas = []
    for path in candidates:
        parts = (_read(path) or "").split()  # "<quota> <period>" or "max <period>"
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            quotas.append((int(parts[0]), int(parts[1])))
    quota = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") or ""  # -1: no quota
    period = _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us") or ""
    if quota.isdigit() and period.isdigit():
        quotas.append((int(quota), int(period)))
    quotas = [(q, p) for q, p in quotas if q > 0 and p > 0]
    if not quotas:
        return None
    return max(1, min(math.ceil(q / p) for q, p in quotas))


def cpu_limits() -> dict[str, int]:
    """Each limit on the CPUs this process may use, by where it comes from."""
    limits: dict[str, int] = {}
    if hasattr(os, "sched_getaffinity"):
        limits["CPU affinity"] = len(os.sched_getaffinity(0))
    else:
        limits["os.cpu_count()"] = os.cpu_count() or 1
    for var in _SLURM_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            limits[var] = int(value)
    quota = _cgroup_quota()
    if quota is not None:
        limits["cgroup CPU quota"] = quota
    return limits


def available_cpus(limits: Mapping[str, int] | None = None) -> int:
    """The number of CPUs this process may use (at least 1): the fewest of `cpu_limits`
    (``limits``: those already read)."""
    return max(1, min((cpu_limits() if limits is None else limits).values()))


def _describe(limits: Mapping[str, int], world_size: int) -> str:
    text = ", ".join(f"{k} {v}" for k, v in limits.items())
    return text + (f"; shared by {world_size} ranks" if world_size > 1 else "")


def _auto(cpus_per_rank: int, on_gpu: bool) -> int:
    if on_gpu:
        return max(0, min(cpus_per_rank - 1, MAX_AUTO_WORKERS_GPU))
    return 0 if cpus_per_rank < 4 else min(cpus_per_rank // 4, MAX_AUTO_WORKERS_CPU)


def _parse(value: int | str) -> int | None:
    """The worker count, or None for ``auto``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return None
        if text.lstrip("-").isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"data.num_workers={value!r}: expected a non-negative integer or 'auto'.")
    if value < 0:
        raise DataError(f"data.num_workers={value}: expected a non-negative integer or 'auto'.")
    return value


def resolve_num_workers(value: int | str, *, on_gpu: bool, world_size: int = 1) -> int:
    """The number of DataLoader workers for ``data.num_workers`` (an int or ``"auto"``).

    ``world_size`` is the number of training processes that share this process's CPUs: the
    ranks on this node when they were started by ``spawn`` or torchrun, 1 when Slurm gave
    each task its own CPUs (srun). Warns (`NumWorkersWarning`) when the value exceeds this
    process's share of the CPUs, or is 0 on a GPU run; raises `DataError` (a ValueError)
    for a negative or non-integer value.
    """
    requested = _parse(value)
    limits = cpu_limits()
    cpus = available_cpus(limits)
    per_rank = max(1, cpus // max(1, world_size))
    where = _describe(limits, world_size)
    if requested is None:
        chosen = _auto(per_rank, on_gpu)
        log.info(
            "salt: data.num_workers=auto -> %d (%d CPUs per rank: %s)", chosen, per_rank, where
        )
        if on_gpu and chosen == 0:
            warnings.warn(
                f"data.num_workers=auto: only {per_rank} CPU per rank ({where}), so batches "
                "are read in the training process and the GPU waits for them; ask for more "
                "CPUs (e.g. Slurm --cpus-per-task).",
                NumWorkersWarning,
                stacklevel=2,
            )
        return chosen
    if requested > per_rank:
        warnings.warn(
            f"data.num_workers={requested} exceeds the {per_rank} CPUs this process may use "
            f"({where}); the workers compete for cores and slow training down. Use "
            f"data.num_workers=auto (here {_auto(per_rank, on_gpu)}) or ask for more CPUs.",
            NumWorkersWarning,
            stacklevel=2,
        )
    elif requested == 0 and on_gpu:
        warnings.warn(
            "data.num_workers=0 on a GPU run: batches are read in the training process and "
            f"the GPU waits for them. Use data.num_workers=auto (here {_auto(per_rank, True)})"
            " or a few workers.",
            NumWorkersWarning,
            stacklevel=2,
        )
    return requested


def loader_options(data: DataConfig, on_gpu: bool) -> dict[str, Any]:
    """``persistent_workers``, ``prefetch_factor`` and ``pin_memory`` for the DataLoader.

    ``pin_memory: auto`` (the default) pins on GPU runs, where it makes host-to-device copies
    faster and asynchronous; pinning is pointless without a GPU, so it is off there. The
    worker options only matter with workers (the loader drops them with 0 workers).
    """
    pin = on_gpu if data.pin_memory == "auto" else bool(data.pin_memory) and on_gpu
    return {
        "persistent_workers": data.persistent_workers,
        "prefetch_factor": data.prefetch_factor,
        "pin_memory": pin,
    }


def die_with_parent(parent: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the kernel kills this worker when its trainer dies.

    PyTorch's own check only notices a dead parent every few seconds, and not at all while a
    worker is blocked in a long read; a trainer killed by SIGKILL (``scancel``, the OOM killer)
    would leave its workers on the node. ``parent`` is the trainer's pid, taken when the loader
    was built: a worker whose parent is already gone exits at once.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("salt: prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:
        os._exit(0)  # the trainer died before the prctl above took effect
