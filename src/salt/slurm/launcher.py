"""hydra-submitit-launcher's SlurmLauncher, checked before it submits and watched while it waits.

``launcher=slurm`` selects it (conf/hydra/launcher/slurm.yaml starts from `SlurmLauncherConf`,
registered by hydra_plugins.salt_slurm, where Hydra requires launchers to be). The jobs run as
with the plugin's launcher (this class's ``__call__`` and ``checkpoint`` are the
plugin's); what changes is the submitting command:

- Before submitting, the request is compared with the partition's nodes (`partition.misfit`):
  a job no node can ever hold is refused at once, naming the key (``check_resources: false``
  skips the comparison).
- A batch that sbatch refuses is one ``salt: error:`` line with sbatch's own message and the
  key to change (`explain.refusal`), not submitit's traceback. One sbatch call submits a whole
  batch (a job array), so a refusal leaves nothing of it queued.
- While waiting for results the queue is read with squeue (not sacct: without accounting
  submitit warned on every poll and never saw a job end without a result). A job pending for a
  reason that waiting cannot lift (`explain.never_starts`) ends the wait: the jobs this command
  submitted are cancelled and one line says why and what to change. A reason that lifts by
  itself (Resources, Priority, ...) is announced once. Ctrl-C stops waiting and leaves the jobs
  in the queue, saying how to cancel them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from omegaconf import OmegaConf

from salt.errors import SlurmError, run_entry_point
from salt.slurm.explain import never_starts, refusal, waiting_for
from salt.slurm.partition import Partition, Request, misfit, partition_names, read_partition

log = logging.getLogger(__name__)

POLL_FIRST_S = 2.0  # the first look at the queue: the scheduler has set a reason by then
POLL_MAX_S = 60.0  # the queue is read ever less often, down to once a minute
# A job that left the queue without a result file: how long the file may take to show up on a
# shared file system (submitit's own wait for it)
RESULT_GRACE_S = 15.0
COMMAND_TIMEOUT_S = 30
RUNNING = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED")


@dataclass
class SlurmLauncherConf(SlurmQueueConf):
    """The plugin's Slurm settings, with salt's launcher and its one setting of its own."""

    _target_: str = "hydra_plugins.salt_slurm.SlurmLauncher"
    # compare the request with the partition's nodes before submitting
    check_resources: bool = True


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def __init__(self, check_resources: bool = True, **params: Any) -> None:
        super().__init__(**params)
        self.check_resources = check_resources

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        """Submit one batch of sweep points and wait for their results; what Slurm refuses
        is one ``salt: error:`` line and exit 1 (``debug=true``: the traceback)."""
        assert self.config is not None
        returns: list[JobReturn] = []
        run_entry_point(
            lambda _: returns.extend(self._launch(job_overrides, initial_job_idx)), self.config
        )
        return returns

    # ---- submitting ---------------------------------------------------------------------------
    def _launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> list[JobReturn]:
        assert self.config is not None
        if shutil.which("sbatch") is None:
            raise SlurmError(
                "sbatch not found: launcher=slurm submits with Slurm's sbatch; run on a machine "
                "of the cluster (a login node), or use launcher=submitit_local to run the jobs here"
            )
        request = Request.from_params(self.params)
        partition = read_partition(self.params.get("partition"))
        if self.check_resources and partition is not None:
            problem = misfit(request, partition)
            if problem:
                raise SlurmError(
                    f"Slurm could never start this job: {problem}; nothing was submitted"
                )

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
        calls = []  # the arguments of this launcher's __call__, one tuple per sweep point
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            calls.append(
                (
                    list(overrides),
                    "hydra.sweep.dir",
                    idx,
                    f"job_id_for_{idx}",
                    Singleton.get_state(),
                )
            )
        jobs = self._submit(calls, partition, initial_job_idx, sweep_dir)
        return self._wait(jobs, request, partition)

    def _executor(self) -> Any:
        import submitit  # lazily, as the plugin: Hydra lists launchers without importing it

        params = dict(self.params)
        executor = submitit.AutoExecutor(
            folder=params.pop("submitit_folder"),
            cluster=self._EXECUTOR,
            **{f"{self._EXECUTOR}_max_num_timeout": params.pop("max_num_timeout")},
        )
        # AutoExecutor takes the settings every cluster has by name, the others prefixed
        common = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in common else f"{self._EXECUTOR}_{k}": v for k, v in params.items()}
        )
        return executor

    def _submit(
        self,
        calls: list[tuple[Any, ...]],
        partition: Partition | None,
        initial_job_idx: int,
        sweep_dir: Path,
    ) -> list[Any]:
        from submitit.core.utils import FailedJobError

        executor = self._executor()
        echoed = io.StringIO()
        try:
            # submitit prints sbatch's stderr when sbatch fails; the refusal line says it
            with contextlib.redirect_stderr(echoed):
                jobs = executor.map_array(self, *zip(*calls, strict=True))
        except FailedJobError as err:
            sbatch = err.__cause__
            if not (
                isinstance(sbatch, subprocess.CalledProcessError)
                and Path(str(sbatch.cmd[0])).name == "sbatch"
            ):
                sys.stderr.write(echoed.getvalue())
                raise
            said = refusal(
                str(sbatch.stderr or ""),
                self.params,
                partition,
                partition_names(),
                sbatch.returncode,
            )
            raise SlurmError(said + _earlier_batches(initial_job_idx, sweep_dir)) from err
        sys.stderr.write(echoed.getvalue())
        return jobs

    # ---- waiting ------------------------------------------------------------------------------
    def _wait(
        self, jobs: list[Any], request: Request, partition: Partition | None
    ) -> list[JobReturn]:
        ids = [str(job.job_id) for job in jobs]
        arrays = sorted({i.split("_")[0] for i in ids}, key=int)
        label = " ".join(arrays)
        where = f" on partition {partition.name}" if partition is not None else ""
        what = (
            f"{len(ids)} sweep points as Slurm job array {label} ({ids[0]} to {ids[-1]})"
            if len(ids) > 1
            else f"Slurm job {label}"
        )
        say(
            f"submitted {what}{where}; waiting for the results (Ctrl-C stops waiting, the jobs "
            f"stay queued: scancel {label} cancels them)"
        )
        try:
            lost = self._watch(jobs, arrays, request, partition)
        except KeyboardInterrupt:
            say(
                f"stopped waiting; Slurm job {label} stays queued or running (scancel {label} "
                "cancels it)"
            )
            sys.exit(130)
        returns = []
        for job in jobs:
            if job.job_id in lost:
                raise SlurmError(
                    f"Slurm job {job.job_id} ended without a result (cancelled, out of time or "
                    f"memory, or its node failed); see {job.paths.stderr}"
                )
            returns.append(job.results()[0])  # a failed run raises its error here
        return returns

    def _watch(
        self,
        jobs: list[Any],
        arrays: list[str],
        request: Request,
        partition: Partition | None,
    ) -> set[str]:
        """Wait until every job has a result or has left the queue without one (returned);
        a job that can never start cancels them all (SlurmError)."""
        label = " ".join(arrays)
        folder = Path(str(self.params["submitit_folder"])).parent
        poll_at, interval = time.monotonic() + POLL_FIRST_S, POLL_FIRST_S
        gone_since: dict[str, float] = {}
        shown: frozenset[str] = frozenset()
        while True:
            _refresh(folder)
            waiting = [job for job in jobs if not _has_result(job)]
            now = time.monotonic()
            if all(now - gone_since.get(job.job_id, now) > RESULT_GRACE_S for job in waiting):
                return {job.job_id for job in waiting}  # empty: every job has its result
            if now >= poll_at:
                states = queue_states(arrays)
                if states is not None:
                    for job in waiting:
                        if job.job_id in states:
                            gone_since.pop(job.job_id, None)
                        else:
                            gone_since.setdefault(job.job_id, now)
                    self._stop_if_never(waiting, states, arrays, request, partition)
                    shown = _announce(label, waiting, states, shown)
                interval = min(2 * interval, POLL_MAX_S)
                poll_at = now + interval
            time.sleep(1)

    def _stop_if_never(
        self,
        waiting: list[Any],
        states: dict[str, tuple[str, str]],
        arrays: list[str],
        request: Request,
        partition: Partition | None,
    ) -> None:
        for job in waiting:
            state, reason = states.get(job.job_id, ("", ""))
            if state != "PENDING":
                continue
            found = misfit(request, partition) if partition is not None else None
            name = partition.name if partition is not None else self.params.get("partition")
            why = never_starts(reason, name, found)
            if why is None:
                continue
            label = " ".join(arrays)
            cancelled = cancel(arrays)
            done = (
                f"cancelled Slurm job {label}, all this command submitted"
                if cancelled is None
                else f"could not cancel it ({cancelled}): scancel {label}"
            )
            raise SlurmError(
                f"Slurm job {job.job_id} can never start (pending, reason {reason}): {why}; {done}"
            )


def say(line: str) -> None:
    print(f"salt: {line}", file=sys.stderr, flush=True)


def _earlier_batches(initial_job_idx: int, sweep_dir: Path) -> str:
    """What an earlier batch of the same sweep left (hydra.sweeper.max_batch_size)."""
    if initial_job_idx == 0:
        return ""
    return f" (sweep points 0-{initial_job_idx - 1} ran before this batch, in {sweep_dir})"


def _has_result(job: Any) -> bool:
    """Every task of the job wrote its result file (submitit's, success or error)."""
    return all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks))


def _refresh(folder: Path) -> None:
    """Make a shared file system show new files of ``folder`` now (as submitit does)."""
    with contextlib.suppress(OSError):
        folder.chmod(folder.stat().st_mode)


def queue_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]] | None:
    """State and reason of each job of ``job_ids`` that Slurm still lists (array tasks one by
    one, as ``57_0``); None when squeue did not answer."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # every id unknown (they left the controller's memory): none is listed
        return {} if "Invalid job id" in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job_id:
            states[job_id] = (state, reason)
    return states


def cancel(job_ids: Sequence[str]) -> str | None:
    """scancel the jobs; None when done, else what went wrong."""
    try:
        out = subprocess.run(
            ["scancel", *job_ids], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return None if out.returncode == 0 else (out.stderr.strip() or f"exit {out.returncode}")


def _announce(
    label: str,
    waiting: list[Any],
    states: dict[str, tuple[str, str]],
    shown: frozenset[str],
) -> frozenset[str]:
    """One line when the reasons the jobs wait for change (or when the last one started), so
    that a long wait is not silent; returns the reasons now shown."""
    pending = Counter(
        states[job.job_id][1]
        for job in waiting
        if job.job_id in states and states[job.job_id][0] == "PENDING"
    )
    running = sum(1 for job in waiting if states.get(job.job_id, ("", ""))[0] in RUNNING)
    reasons = frozenset(pending) - {"None"}  # "None": the scheduler has not looked yet
    if reasons and reasons != shown:
        parts = [f"{n} pending ({r}: {waiting_for(r)})" for r, n in sorted(pending.items())]
        if running:
            parts.append(f"{running} running")
        say(
            f"Slurm job {label}: {', '.join(parts)}; waiting (Ctrl-C stops waiting, the jobs "
            "stay queued)"
        )
        return reasons
    if shown and not pending and running:
        say(f"Slurm job {label}: all started ({running} running)")
        return frozenset()
    return shown
