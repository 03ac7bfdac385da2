"""Distributed data parallel set-up: who am I, which device, and the process group.

Processes are started by one of: torchrun, submitit (``hydra/launcher=slurm``), a plain
``srun``, or `spawn` for ``trainer.devices=N`` on one node. Each process then calls
`init_distributed`, which reads its rank from the launcher's environment
(`detect_environment`), picks its device and joins the process group. The helpers at the end
(`barrier`, `all_reduce_sum`, ...) do nothing when not distributed, so the training loop is
written once.

The training entry must be importable without side effects (an ``if __name__ ==
"__main__":`` guard), because `spawn` starts fresh interpreters that import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from salt.errors import INTERRUPTED, ConfigError, Interrupted, RankFailedError, RankTimeoutError
from salt.signals import (
    STOP_SIGNALS,
    Catch,
    ctrl_c_ignored,
    ctrl_c_interrupts,
    ignore_ctrl_c,
)
from salt.training.config import ACCELERATORS, devices_setting
from salt.training.rank_failure import collective

__all__ = [
    "REPORTED_EXIT_CODE",
    "SPAWNED_ENV",
    "DistInfo",
    "RankFailedError",
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "collective",
    "detect_environment",
    "first_host",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main",
    "num_processes",
    "ranks_where",
    "spawn",
]

logger = logging.getLogger(__name__)

# Ports derived from a job id fall in [15000, 30000): below Linux's ephemeral range.
_PORT_BASE, _PORT_SPAN = 15000, 15000


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool
    backend: str | None  # None when not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# A process started by `spawn` that exits with this code has printed its own one-line error:
# the parent adds nothing to it.
REPORTED_EXIT_CODE = 3
SPAWNED_ENV = "SALT_SPAWNED"  # set in processes started by `spawn`

# A gloo worker thread frees a finished collective's tensors just after ``wait()`` has returned,
# and needs the GIL for it; if the interpreter is shutting down by then the thread is ended with
# pthread_exit and the process aborts ("terminate called without an active exception", the rank
# ends with SIGABRT; 2 to 12 of 60 two-rank runs here, torch 2.13: scripts/check_rank_exit.py).
# Destroying the group does not stop those threads, so `cleanup` releases the GIL this long.
GLOO_DRAIN_S = 0.2
# After a rank ended with an error, `spawn` gives the others this long to end by themselves
# (their collectives fail at once, and rank 0 may still be printing what was kept), then
# SIGTERM, then as long again before SIGKILL.
EXIT_GRACE_S = 3.0
_PR_SET_NAME = 15  # <linux/prctl.h>


# --------------------------------------------------------------------------- environment


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is required but not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def _port_from_job(job_id: str) -> int:
    """A port all tasks of one job agree on without talking to each other."""
    if "MASTER_PORT" in os.environ:
        return _env_int("MASTER_PORT")
    return _PORT_BASE + zlib.crc32(job_id.encode()) % _PORT_SPAN


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list, e.g. ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    group = nodelist[:end].strip()
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", group)
    if match is None:
        return group
    prefix, ranges, suffix = match.groups()
    return prefix + re.split(r"[-,]", ranges)[0] + suffix


def _slurm_master(nodelist: str) -> str:
    """The first host of the step, via ``scontrol`` when available (the reference parser)."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError) as err:
            logger.warning(
                "scontrol show hostnames %s failed (%s); parsing it myself", nodelist, err
            )
    return first_host(nodelist)


def detect_environment() -> dict[str, Any] | None:
    """Rank, world size, local rank and rendezvous address from the launcher, or None.

    Looked for in this order: torchrun (and `spawn`) variables ``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; a submitit job (``SUBMITIT_EXECUTOR``);
    a task started by ``srun`` (``SLURM_STEP_NUM_TASKS``, which only srun sets: a batch script
    running python directly is one process, even with ``--ntasks=4``, and must not wait for
    three others). Returns None when no launcher is found. The result has keys ``source``,
    ``rank``, ``world_size``, ``local_rank``, ``master_addr``, ``master_port``; world_size may
    be 1. For submitit and srun the port is ``MASTER_PORT`` if set, else derived from the job
    id so every task agrees.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = _env_int("WORLD_SIZE")
        return {
            "source": "torchrun",
            "rank": _env_int("RANK"),
            "world_size": world_size,
            "local_rank": _env_int("LOCAL_RANK", 0 if world_size == 1 else None),
            "master_addr": env.get("MASTER_ADDR"),
            "master_port": _env_int("MASTER_PORT") if "MASTER_PORT" in env else None,
        }
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit  # lazy: only needed inside submitit jobs

        job = submitit.JobEnvironment()
        local = env["SUBMITIT_EXECUTOR"] == "local"
        return {
            "source": "submitit",
            "rank": job.global_rank,
            "world_size": job.num_tasks,
            "local_rank": job.local_rank,
            "master_addr": "127.0.0.1" if local else job.hostnames[0],
            "master_port": _port_from_job(str(job.job_id)),
        }
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        return {
            "source": "slurm",
            "rank": _env_int("SLURM_PROCID"),
            "world_size": _env_int("SLURM_STEP_NUM_TASKS"),
            "local_rank": _env_int("SLURM_LOCALID", 0),
            "master_addr": _slurm_master(nodelist) if nodelist else socket.gethostname(),
            "master_port": _port_from_job(env.get("SLURM_JOB_ID", "0")),
        }
    return None


# --------------------------------------------------------------------------- devices


def _resolve_devices(devices: Any, accelerator: str) -> tuple[str, int, list[int] | None]:
    """``(device type, process count, explicit GPU ids or None)`` for a devices setting."""
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    devices = devices_setting(devices)
    want_gpu = accelerator in ("gpu", "cuda")
    have_gpu = torch.cuda.is_available()
    if want_gpu and not have_gpu:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r} but CUDA is not available on this machine; "
            "expected a visible GPU (set trainer.accelerator=cpu or auto)"
        )
    use_gpu = want_gpu or (accelerator == "auto" and have_gpu)
    gpu_count = torch.cuda.device_count() if have_gpu else 0

    if devices == "cpu":
        if want_gpu:
            raise ConfigError(
                f"trainer.devices='cpu' contradicts trainer.accelerator={accelerator!r}"
            )
        return "cpu", 1, None
    if devices == "auto":
        return ("cuda", gpu_count, None) if use_gpu else ("cpu", 1, None)
    if isinstance(devices, int):
        if use_gpu and devices > gpu_count:
            raise ConfigError(f"trainer.devices={devices} but only {gpu_count} GPUs are visible")
        return ("cuda" if use_gpu else "cpu"), devices, None
    if accelerator == "cpu" or not have_gpu:
        raise ConfigError(f"trainer.devices={devices} names GPUs but CUDA is not in use")
    if max(devices) >= gpu_count:
        raise ConfigError(f"trainer.devices={devices} but only {gpu_count} GPUs are visible")
    return "cuda", len(devices), devices


def num_processes(devices: Any, accelerator: str = "auto") -> int:
    """How many processes ``trainer.devices`` asks for on this node (what to `spawn`)."""
    return _resolve_devices(devices, accelerator)[1]


def _cuda_index(ids: list[int] | None, local_rank: int) -> int:
    if ids is not None:
        if local_rank >= len(ids):
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: trainer.devices={ids} lists {len(ids)}"
            )
        return ids[local_rank]
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:  # Slurm --gpus-per-task=1: every task sees only its own GPU as cuda:0
        return 0
    raise RuntimeError(f"local rank {local_rank} has no GPU: only {count} are visible")


def init_distributed(
    devices: Any,
    accelerator: str = "auto",
    timeout: datetime.timedelta | None = None,
) -> DistInfo:
    """Pick this process's device and, when world size > 1, join the process group.

    ``devices`` as in the config: ``"cpu"``, ``"auto"``, a count, or a list of GPU ids. Under
    a launcher the launcher sets the world size and the local rank picks the device; without
    one, a setting that asks for more than one process is an error (start them with `spawn`).
    Backend: nccl on CUDA, gloo on CPU. ``timeout`` bounds collective operations (torch's
    default when None).
    """
    kind, count, ids = _resolve_devices(devices, accelerator)
    launch = detect_environment()
    if launch is None:
        if count > 1:
            raise RuntimeError(
                f"trainer.devices={devices!r} asks for {count} processes, but this process was "
                "not started by a launcher (torchrun, srun, submitit); start the processes "
                "with salt.training.distributed.spawn"
            )
        rank, local_rank, world_size = 0, 0, 1
    else:
        rank, local_rank = launch["rank"], launch["local_rank"]
        world_size = launch["world_size"]
        if not 0 <= rank < world_size:
            raise RuntimeError(f"rank {rank} is outside world size {world_size} ({launch})")

    if kind == "cuda":
        device = torch.device("cuda", _cuda_index(ids, local_rank))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"

    if world_size == 1:
        return DistInfo(rank, local_rank, 1, device, True, None)
    assert launch is not None  # world_size > 1 only comes from a launcher
    if dist.is_initialized():
        raise RuntimeError("init_distributed: a process group is already initialised")
    if launch["source"] == "torchrun":
        # env:// also picks up torchrun's agent store instead of opening a second one.
        if launch["master_addr"] is None or launch["master_port"] is None:
            raise RuntimeError("MASTER_ADDR and MASTER_PORT must be set with RANK/WORLD_SIZE")
        init_method = "env://"
    else:
        init_method = f"tcp://{launch['master_addr']}:{launch['master_port']}"
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    try:
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs
        )
    except RuntimeError as err:  # DistStoreError: "... waiting for clients. 1/2 clients joined"
        said = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else repr(err)
        wait = f"={timeout.total_seconds():g}" if timeout is not None else ""
        raise RankTimeoutError(
            rank,
            f"the {world_size} ranks did not all join the process group ({init_method}): "
            f"{said}; a rank did not start, or cannot reach rank 0's host (the wait is "
            f"trainer.ddp_timeout_s{wait})",
        ) from err
    logger.info(
        "rank %d/%d (local %d) on %s, backend %s, via %s",
        rank,
        world_size,
        local_rank,
        device,
        backend,
        launch["source"],
    )
    return DistInfo(rank, local_rank, world_size, device, rank == 0, backend)


# --------------------------------------------------------------------------- spawn


def _free_port() -> int:
    # The port is free now; another process could take it before rank 0 binds, but on one
    # node that race is rare, and the failure is a clear "address in use" error.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _name_process(name: str) -> None:
    """Name this process as ``ps``, ``top`` and /proc/<pid>/comm show it (Linux; at most 15
    bytes): which pid is which rank, when one hangs."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _spawned(
    rank: int,
    fn: Callable[..., Any],
    nprocs: int,
    port: int,
    args: tuple[Any, ...],
    interrupted: Any,
) -> None:
    # Ctrl-C was ignored while this interpreter started (see `spawn`); from here on it is
    # Python's KeyboardInterrupt again, and one that came meanwhile is acted on now
    ctrl_c_interrupts()
    _name_process(f"salt-rank{rank}")
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "LOCAL_WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            SPAWNED_ENV: "1",
        }
    )
    try:
        if interrupted.value:
            raise KeyboardInterrupt
        fn(rank, *args)
    except KeyboardInterrupt:  # `fn` said nothing about it: the line is rank 0's to print
        if rank == 0:
            print(INTERRUPTED, file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    finally:
        cleanup()


def spawn(fn: Callable[..., Any], nprocs: int, args: tuple[Any, ...] = ()) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes on this node and wait.

    Each process gets torchrun-style variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``), so `init_distributed` finds them.
    ``fn`` must be importable (a module-level function). If a process fails, the others are
    terminated and `RankFailedError` is raised here, naming the rank and holding its traceback.
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"spawn: nprocs must be an integer >= 1, got {nprocs!r}")
    port = _free_port()
    # torch logs a warning for each rank it stops after another failed: noise next to the error
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    interrupted = mp.get_context("spawn").Value("b", 0)
    try:
        # The ranks take the stop signals themselves: a terminal's Ctrl-C and Slurm's signals
        # reach every process. This one waits for them to save and end instead of dying first
        # (and orphaning them), and passes on a signal sent to it alone (kill <pid>); not
        # Ctrl-C, which the ranks got too: a second one would mean "stop now" to them.
        with Catch(STOP_SIGNALS) as caught:
            # Started with Ctrl-C ignored (inherited): a KeyboardInterrupt while a rank's
            # interpreter imports would be a traceback; the rank learns of it from `interrupted`
            with ctrl_c_ignored():
                ctx = mp.start_processes(
                    _spawned,
                    args=(fn, nprocs, port, args, interrupted),
                    nprocs=nprocs,
                    join=False,
                    start_method="spawn",
                )
            passed = 0
            while not ctx.join(timeout=0.1, grace_period=EXIT_GRACE_S):
                for signum in caught.caught[passed:]:
                    if signum == signal.SIGINT:
                        interrupted.value = 1
                    else:
                        _signal_ranks(ctx.pids(), signum)
                passed = len(caught.caught)
    except mp.ProcessRaisedException as err:
        raise RankFailedError(err.error_index, f"rank {err.error_index} failed:\n{err}") from err
    except mp.ProcessExitedException as err:
        stop_codes = {128 + getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)}
        if err.exit_code in stop_codes:  # a stop by signal: rank 0 said what was kept
            ignore_ctrl_c()  # and one more Ctrl-C must not turn the exit into a traceback
            raise Interrupted(
                err.exit_code - 128, f"rank {err.error_index} was stopped", reported=True
            ) from None
        how = f"signal {err.signal_name}" if err.signal_name else f"exit code {err.exit_code}"
        raise RankFailedError(
            err.error_index,
            f"rank {err.error_index} (pid {err.error_pid}) ended with {how}",
            reported=err.exit_code == REPORTED_EXIT_CODE,
        ) from err
    finally:
        spawn_log.setLevel(level)


def _signal_ranks(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


# --------------------------------------------------------------------------- helpers


def is_distributed() -> bool:
    """Whether a process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, and when not distributed."""
    return get_rank() == 0


# Each helper names its collective (``what``) for the one-line error that names the rank it
# waited for when it fails (salt.training.rank_failure). Every rank must call the same helpers
# in the same order with tensors of the same shape, whatever its share of the data.


def barrier(what: str = "a barrier") -> None:
    """Wait for all ranks."""
    if is_distributed():
        with collective(what):
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, what: str = "a sum over the ranks") -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it."""
    if is_distributed():
        with collective(what):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def ranks_where(flag: bool, what: str) -> list[int]:
    """The ranks on which ``flag`` is true (every rank calls it; one small all-reduce)."""
    if not is_distributed():
        return [0] if flag else []
    nccl = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
    votes = torch.zeros(get_world_size(), dtype=torch.int32, device=device)
    votes[get_rank()] = int(flag)
    return [r for r, v in enumerate(all_reduce_sum(votes, what).tolist()) if v]


def broadcast_object(obj: Any, src: int = 0, what: str = "a message from rank 0") -> Any:
    """``obj`` from rank ``src`` on every rank (pickled: keep it small)."""
    if not is_distributed():
        return obj
    holder = [obj if get_rank() == src else None]
    with collective(what):
        dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any, what: str = "a gather from every rank") -> list[Any]:
    """``obj`` from every rank, in rank order (pickled: keep it small); ``[obj]`` alone."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    with collective(what):
        dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Destroy the process group if one is initialised; call it last thing before exiting."""
    if is_distributed():
        gloo = dist.get_backend() == "gloo"
        dist.destroy_process_group()
        if gloo:
            time.sleep(GLOO_DRAIN_S)
