"""Launchers: sweeps through submitit, on this machine and on a real (local) Slurm cluster.

The tests marked ``slurm`` need the single-node cluster of scripts/slurm/start_local_cluster.sh.
Without a responding cluster they skip, unless ``SALT_REQUIRE_SLURM=1`` (CI) makes them fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import salt
from salt.data.build import ensure_sample
from salt.training import checkpoint as ckpt
from tests.test_train import TINY_MODEL

# the configs of the salt under test (the one the training subprocesses run)
CONF = Path(salt.__file__).resolve().parents[2] / "conf"
TINY = [
    "force=true",
    "trainer.progress_bar=false",
    "data.chunk_batches=3",
    "data.num_workers=0",
    "trainer.max_epochs=2",
    *TINY_MODEL,
]
# Slurm jobs on the local cluster: CPU only, one CPU per task.
SLURM_CPU = [
    "launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
]


# ---- helpers ------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """The environment of the training processes (Slurm jobs inherit it through sbatch).

    One thread per process: every run computes with the same thread count (CPU results may
    depend on it), and two processes share the two cores of a small machine.
    """
    src = str(Path(salt.__file__).resolve().parents[1])  # the salt this test imports
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def salt_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "salt.train", *args]


def run_dirs(log_dir: Path) -> list[Path]:
    return sorted(p for p in log_dir.iterdir() if (p / "config.yaml").exists())


def final_state(run_dir: Path) -> dict:
    return ckpt.load_checkpoint(run_dir / "ckpts" / "last.ckpt")


def submitit_logs(log_dir: Path) -> str:
    """The jobs' logs, for failure messages."""
    parts = []
    for path in sorted((log_dir / "multirun" / ".submitit").rglob("*_log.*")):
        parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def controller_refuses() -> bool:
    """Whether slurm.conf names a controller that refuses connections (nothing listens: no
    cluster), which sinfo only concludes after seconds of retries."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        text = conf.read_text()
    except OSError:
        return False
    host = re.search(r"^\s*SlurmctldHost\s*=\s*([^\s(]+)(?:\(([^)\s]+)\))?", text, re.M | re.I)
    port = re.search(r"^\s*SlurmctldPort\s*=\s*(\d+)\s*$", text, re.M | re.I)
    if host is None:
        return False
    address = (host.group(2) or host.group(1), int(port.group(1)) if port else 6817)
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # unresolvable, unreachable, slow: sinfo decides
    return False


def slurm_cpus() -> int | None:
    """CPUs of the cluster's first responding node, or None when no cluster answers."""
    if shutil.which("sinfo") is None or controller_refuses():
        return None
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%t %c"], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return None
    for line in out.stdout.split("\n") if out.returncode == 0 else []:
        state, _, cpus = line.partition(" ")
        if state.rstrip("*") in ("idle", "mix", "alloc", "comp"):
            return int(cpus)
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> int:
    """The cluster's CPU count; skips (or fails under SALT_REQUIRE_SLURM=1) without one.

    Asked once: sinfo takes seconds to give up on a cluster that does not answer.
    """
    cpus = slurm_cpus()
    if cpus is None:
        why = "no responding Slurm cluster (start one: scripts/slurm/start_local_cluster.sh)"
        if os.environ.get("SALT_REQUIRE_SLURM") == "1":
            pytest.fail(f"SALT_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    return cpus


@pytest.fixture
def job_name() -> Iterator[str]:
    """A Slurm job name unique to this test; its jobs are cancelled afterwards, whatever
    happened."""
    name = f"salt-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["scancel", "--name", name], capture_output=True, timeout=30)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[list[str]], subprocess.Popen]]:
    """Start a command in the background (output captured); whatever of it still runs at the
    end of the test is killed, with its children (DDP ranks)."""
    started: list[subprocess.Popen] = []

    def _start(cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: killed as a whole
        )
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def squeue_id(name: str) -> str | None:
    out = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.split()[0] if out.stdout.split() else None


def job_restarts(job_id: str) -> int:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30
    )
    match = re.search(r"\bRestarts=(\d+)", out.stdout)
    return int(match.group(1)) if match else 0


def finish(proc: subprocess.Popen, timeout: float, log_dir: Path) -> str:
    """Wait for a sweep's submitting process (from `start`); on a hang, kill it and show the job
    logs. Returns its output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"no result after {timeout:.0f} s:\n{out[-3000:]}\n{submitit_logs(log_dir)}")
    assert proc.returncode == 0, f"{out[-3000:]}\n{submitit_logs(log_dir)}"
    return out


# ---- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "target"),
    [
        ([], "BasicLauncher"),
        (["launcher=local"], "BasicLauncher"),
        (["launcher=submitit_local"], "submitit_launcher.LocalLauncher"),
        (["launcher=slurm"], "hydra_plugins.salt_slurm.SlurmLauncher"),
        (["hydra/launcher=slurm"], "hydra_plugins.salt_slurm.SlurmLauncher"),
    ],
)
def test_launcher_choices(overrides: list[str], target: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(target)
    assert "launcher" not in cfg  # the group only configures Hydra, not the training
    if target.endswith("SlurmLauncher"):
        # a time limit requeues the job: submitit's signal, retries, sbatch --requeue
        assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0
        assert launcher.additional_parameters.requeue is True
        assert launcher.gpus_per_node == launcher.tasks_per_node == 1  # one task per GPU
        assert launcher.check_resources is True  # compared with the partition before submitting


def test_slurm_gpus_follow_tasks() -> None:
    """One task per GPU: asking for 4 tasks per node asks for 4 GPUs, unless told otherwise."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        four = compose(
            "train",
            overrides=["launcher=slurm", "hydra.launcher.tasks_per_node=4"],
            return_hydra_config=True,
        )
        cpu = compose(
            "train",
            overrides=[*SLURM_CPU, "hydra.launcher.tasks_per_node=2"],
            return_hydra_config=True,
        )
    assert four.hydra.launcher.gpus_per_node == 4
    assert cpu.hydra.launcher.gpus_per_node is None and cpu.hydra.launcher.tasks_per_node == 2


# ---- submitit on this machine -------------------------------------------------------------
@pytest.mark.slow
def test_submitit_local_runs_ddp_tasks(tmp_path: Path, start: Callable) -> None:
    """launcher=submitit_local: a submitit job of two tasks is one DDP run of world size 2."""
    log_dir = tmp_path / "logs"
    cmd = salt_train(
        "-m",
        "launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        *TINY,
        "logger=none",
        "data.sample.num_jets=1200",
        "data.batch_size=100",
        f"data.sample.dir={tmp_path / 'cache'}",
        f"log_dir={log_dir}",
    )
    proc = start(cmd)
    finish(proc, 300, log_dir)
    (run,) = run_dirs(log_dir)  # rank 0 alone writes the run directory
    meta = yaml.safe_load((run / "metadata.yaml").read_text())
    assert meta["world_size"] == 2, meta
    counters = final_state(run)["counters"]
    # 1200 jets / 100 per batch, split over two ranks: 6 steps per epoch
    assert (counters["epoch"], counters["step"], counters["epoch_complete"]) == (1, 12, True)
    logs = submitit_logs(log_dir)
    assert "rank 1/2" in logs and "via submitit" in logs


# ---- Slurm --------------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_runs_one_slurm_job_per_point(
    tmp_path: Path, slurm_cluster: int, job_name: str, start: Callable
) -> None:
    log_dir = tmp_path / "logs"
    cmd = salt_train(
        "-m",
        *SLURM_CPU,
        "hydra.launcher.timeout_min=10",
        f"hydra.launcher.name={job_name}",
        *TINY,
        "logger=local",
        "data.sample.num_jets=1200",
        "data.batch_size=100",
        f"data.sample.dir={tmp_path / 'cache'}",
        f"log_dir={log_dir}",
        "attention=scaled_dot_product,gatv2",
    )
    proc = start(cmd)
    out = finish(proc, 300, log_dir)
    # the wait reads the queue with squeue: no sacct warnings on a cluster without accounting
    assert "sacct" not in out, out
    assert re.search(r"salt: submitted 2 sweep points as Slurm job array \d+ ", out), out
    runs = run_dirs(log_dir)
    assert len(runs) == 2, runs
    kinds = sorted(
        yaml.safe_load((r / "config.yaml").read_text())["model"]["attention"]["type"] for r in runs
    )
    assert kinds == ["gatv2", "scaled_dot_product"]
    for run in runs:
        state = final_state(run)
        assert state["counters"]["epoch"] == 1 and state["counters"]["epoch_complete"]
        assert (run / "metrics.jsonl").exists()
    # each array task recorded its run directory, for its requeued self
    markers = {p.read_text().strip() for p in (log_dir / ".slurm_jobs").iterdir()}
    assert markers == {str(r.resolve()) for r in runs}
    (script,) = (log_dir / "multirun" / ".submitit").rglob("*_submission.sh")
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and "#SBATCH --requeue" in text


# Slurm checks time limits every 30 s: with a 1-minute limit and signal_delay_s=5 the pre-timeout
# signal comes 25-55 s into the job. The run must not finish within its first attempt: it trains
# for TRAIN_S seconds on an idle machine, and the reference run beside the first attempt halves
# the attempt's speed.
FIRST_ATTEMPT_S = 55
TRAIN_S = 60


def two_rank_steps_per_s(tmp_path: Path, common: list[str]) -> float:
    """Optimizer steps per second of a two-rank CPU run on this machine (a short local run)."""
    log_dir = tmp_path / "speed" / "logs"
    out = subprocess.run(
        salt_train(
            *common,
            "data.sample.num_jets=4000",  # 200 steps per rank
            "trainer.max_epochs=1",
            "logger.log_every_n_steps=50",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            f"log_dir={log_dir}",
        ),
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(log_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["time"]) for r in rows if "train/loss" in r]
    (s0, t0), (s1, t1) = steps[0], steps[-1]  # from the first logged step: no start-up time
    return (s1 - s0) / (t1 - t0)


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_requeues_and_resumes_bitwise(
    tmp_path: Path, slurm_cluster: int, job_name: str, start: Callable
) -> None:
    """A two-task DDP job reaches its 1-minute time limit mid-training: Slurm's pre-timeout
    signal makes every rank stop at the same step, rank 0 saves, submitit requeues the job, and
    the requeued job finishes the same run directory with the weights of an uninterrupted run.
    """
    if slurm_cluster < 2:
        pytest.skip(f"the cluster's node has {slurm_cluster} CPU; two tasks need 2")
    cache = tmp_path / "cache"
    common = [
        *TINY,
        "data.batch_size=10",
        "data.chunk_batches=10",
        "logger=local",
        "logger.log_every_n_steps=200",
        f"data.sample.dir={cache}",
    ]
    # as many jets as two ranks train in TRAIN_S seconds here (2 epochs, 20 jets per step)
    steps = two_rank_steps_per_s(tmp_path, common) * TRAIN_S
    num_jets = max(4000, round(steps * 10 / 1000) * 1000)
    common.append(f"data.sample.num_jets={num_jets}")
    ensure_sample(cache, num_jets, 42)  # written once, before the two runs start

    slurm_logs = tmp_path / "slurm" / "logs"
    job = start(
        salt_train(
            "-m",
            *SLURM_CPU,
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=1",
            "hydra.launcher.signal_delay_s=5",
            f"hydra.launcher.name={job_name}",
            *common,
            f"log_dir={slurm_logs}",
        ),
    )
    # the reference: the same two-rank run on this machine, uninterrupted, meanwhile (sharing
    # the cores only slows the job's first attempt, which must not finish anyway)
    reference = start(
        salt_train(
            *common,
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            f"log_dir={tmp_path / 'reference' / 'logs'}",
        ),
    )
    # Once requeued, the job gets a longer limit: the requeued attempt must finish, and would
    # otherwise be signalled again after 25-55 s.
    requeued, deadline = False, time.time() + 4 * FIRST_ATTEMPT_S
    while time.time() < deadline and job.poll() is None:
        job_id = squeue_id(job_name)
        if job_id and job_restarts(job_id) >= 1:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)
            requeued = True
            break
        time.sleep(0.2)
    ref_out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_out[-3000:]
    finish(job, 600, slurm_logs)
    logs = submitit_logs(slurm_logs)
    assert requeued, f"the job was never requeued ({num_jets} jets):\n{logs}"

    (run,) = run_dirs(slurm_logs)  # the requeued job continued the same run directory
    assert f"requeued job continues {run}" in logs
    meta = yaml.safe_load((run / "metadata.yaml").read_text())
    assert meta["resumed_from"] == str(run / "ckpts" / "last.ckpt")
    assert meta["world_size"] == 2
    (ref_run,) = run_dirs(tmp_path / "reference" / "logs")
    final, expected = final_state(run), final_state(ref_run)
    assert final["counters"] == expected["counters"]
    assert final["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_script_requeues_after_stop_signal(
    tmp_path: Path, slurm_cluster: int, job_name: str
) -> None:
    """scripts/submit_slurm.sh: the pre-timeout signal (sent by hand here, as Slurm sends it
    to the job's steps) stops the training, the script requeues the job, and the requeued job
    finishes the same run directory bit for bit."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "submit_slurm.sh"
    # 240 steps per epoch: a few seconds, long enough to be stopped in the middle
    common = [
        *TINY,
        "logger=none",
        "data.sample.num_jets=2400",
        "data.batch_size=10",
        f"data.sample.dir={tmp_path / 'cache'}",
    ]
    ensure_sample(tmp_path / "cache", 2400, 42)
    env = {**child_env(), "SALT_PYTHON": sys.executable}
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--job-name={job_name}",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=10",
            str(script),
            *common,
            "log_dir=logs",  # relative: the submission directory in every attempt
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    output = tmp_path / f"slurm-{job_name}-{job_id}.out"

    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "logs").glob("*/metadata.yaml")):
        time.sleep(0.01)
    assert list((tmp_path / "logs").glob("*/metadata.yaml")), output.read_text()
    # what Slurm does --signal seconds before the time limit: USR2 to the job's tasks
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)

    reference = subprocess.run(
        salt_train(*common, f"log_dir={tmp_path / 'reference'}"),
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    deadline = time.time() + 240
    while time.time() < deadline and squeue_id(job_name) is not None:
        time.sleep(0.2)
    log = output.read_text()
    assert squeue_id(job_name) is None, f"job {job_id} still queued or running:\n{log}"
    assert "stopped by the pre-timeout signal; requeueing" in log and "attempt 2" in log, log
    (run,) = run_dirs(tmp_path / "logs")
    final = final_state(run)
    assert final["counters"]["step"] == 480 and final["counters"]["epoch_complete"], log
    expected = final_state(run_dirs(tmp_path / "reference")[0])["model"]
    for key, value in expected.items():
        assert torch.equal(final["model"][key], value), key


# ---- what Slurm refuses, or can never start -------------------------------------------------
# A sweep that Slurm refuses or can never start is one `salt: error:` line naming the key, exit
# 1, no traceback and no job left behind. Nothing trains in these tests: they end at submission.
def fails(tmp_path: Path, *args: str) -> str:
    """Run a sweep that must fail: exit 1, one `salt: error:` line, no traceback; returns it."""
    out = subprocess.run(
        salt_train("-m", *args, *TINY, f"log_dir={tmp_path / 'logs'}"),
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("salt: error:")]
    assert len(errors) == 1, out.stderr
    assert "sbatch: error" not in out.stderr  # sbatch's words are in the line, once
    return errors[0]


def queued(name: str) -> list[str]:
    """The jobs named ``name`` still pending or running."""
    out = subprocess.run(
        ["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.split()


def cluster_has_gpus() -> bool:
    out = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30)
    return "gpu" in out.stdout


class Lines:
    """The output lines of a command from `start`, as they come (read by a thread)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        pytest.fail(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))

    def end(self, timeout: float) -> int:
        """Wait for the command to end; its exit status."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def occupy(name: str, cpus: int) -> str:
    """A job named ``name`` holding every CPU of the node, running: the next job waits for
    Resources. Returns its id."""
    job_id = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--cpus-per-task={cpus}",
            "--time=5",
            "--output=/dev/null",
            "--wrap=sleep 300",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        if state == "RUNNING":
            return job_id
        time.sleep(0.2)
    pytest.fail(f"the job holding the node's CPUs never ran (state {state!r})")


@pytest.mark.slurm
@pytest.mark.parametrize("refused", ["gres", "partition"])
def test_a_sweep_sbatch_refuses_is_one_line_naming_the_key(
    tmp_path: Path, slurm_cluster: int, job_name: str, refused: str
) -> None:
    """The launcher's default of one GPU per task on a cluster without GPUs, and a partition
    that does not exist: sbatch's own message and the key to change, nothing queued."""
    if refused == "gres":
        if cluster_has_gpus():
            pytest.skip("this cluster has GPUs: sbatch accepts the default GPU request")
        args = ["launcher=slurm", "hydra.launcher.cpus_per_task=1"]
        says = (
            "salt: error: Slurm refused the job: Invalid generic resource (gres) specification; "
            "hydra.launcher.gpus_per_node=1 asks for GPUs and partition "
        )
        then = "set hydra.launcher.gpus_per_node=null for a CPU-only job"
    else:
        args = [*SLURM_CPU, "hydra.launcher.partition=nosuchpartition"]
        says = (
            "salt: error: Slurm refused the job: invalid partition specified: nosuchpartition "
            "(Invalid partition name specified); change hydra.launcher.partition=nosuchpartition "
            "(partitions: "
        )
        partitions = subprocess.run(
            ["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30
        ).stdout.split()
        then = partitions[0]  # the cluster's partitions are listed
    line = fails(tmp_path, *args, f"hydra.launcher.name={job_name}", "seed=1,2")
    assert line.startswith(says) and then in line, line
    assert queued(job_name) == []


@pytest.mark.slurm
@pytest.mark.parametrize("setting", ["cpus_per_task", "mem_gb", "nodes"])
def test_a_job_no_node_can_hold_is_refused_before_submitting(
    tmp_path: Path, slurm_cluster: int, job_name: str, setting: str
) -> None:
    """Slurm would queue these and leave them pending for ever (or refuse them with a generic
    message): the comparison with the partition's nodes refuses them first."""
    too_many = {"cpus_per_task": slurm_cluster + 1, "mem_gb": 10**6, "nodes": 10**4}[setting]
    line = fails(
        tmp_path,
        *SLURM_CPU,
        f"hydra.launcher.{setting}={too_many}",
        f"hydra.launcher.name={job_name}",
        "seed=1,2",
    )
    assert line.startswith(
        f"salt: error: Slurm could never start this job: hydra.launcher.{setting}={too_many} "
        f"asks for {too_many} "
    ), line
    assert line.endswith("; nothing was submitted"), line
    assert not (tmp_path / "logs" / "multirun" / ".submitit").exists()
    assert queued(job_name) == []


@pytest.mark.slurm
def test_a_job_that_can_never_start_is_cancelled_with_one_line(
    tmp_path: Path, slurm_cluster: int, job_name: str
) -> None:
    """Without the comparison (check_resources=false), the launcher's default of 8 CPUs per
    task on a smaller node: Slurm queues the jobs, they pend with reason PartitionConfig; the
    wait notices it, cancels every job of the sweep and says why and what to change."""
    cpus = slurm_cluster + 1
    started = time.monotonic()
    line = fails(
        tmp_path,
        *SLURM_CPU,
        f"hydra.launcher.cpus_per_task={cpus}",
        "hydra.launcher.check_resources=false",
        f"hydra.launcher.name={job_name}",
        "seed=1,2",
    )
    match = re.fullmatch(
        r"salt: error: Slurm job (\d+)_\d can never start \(pending, reason PartitionConfig\): "
        rf"hydra\.launcher\.cpus_per_task={cpus} asks for {cpus} CPUs on one node, more than "
        rf"any node of partition \S+ has \({slurm_cluster}\); lower "
        rf"hydra\.launcher\.cpus_per_task to at most {slurm_cluster}; cancelled Slurm job "
        r"(\d+), all this command submitted",
        line,
    )
    assert match and match.group(1) == match.group(2), line
    assert queued(job_name) == []
    assert time.monotonic() - started < 60  # noticed at the first looks at the queue


def submit_behind_a_full_node(
    tmp_path: Path, cpus: int, job_name: str, start: Callable
) -> tuple[Lines, str]:
    """A sweep submitted while `occupy` holds the node: the running command's output lines
    (`Lines.proc` is the command) and its job's id, once it said it submitted it."""
    occupy(job_name, cpus)
    proc = start(
        salt_train(
            "-m", *SLURM_CPU, f"hydra.launcher.name={job_name}", *TINY, f"log_dir={tmp_path}"
        )
    )
    lines = Lines(proc)
    job_id = lines.wait_for(r"^salt: submitted Slurm job (\d+) on partition ", 60).group(1)
    return lines, job_id


@pytest.mark.slurm
def test_a_waiting_job_is_announced_and_ctrl_c_leaves_it_queued(
    tmp_path: Path, slurm_cluster: int, job_name: str, start: Callable
) -> None:
    """A job that waits for Resources is announced once; Ctrl-C stops the waiting command
    (exit 130) and the job keeps its place in the queue."""
    lines, job_id = submit_behind_a_full_node(tmp_path, slurm_cluster, job_name, start)
    lines.wait_for(
        rf"^salt: Slurm job {job_id}: 1 pending \(Resources: the CPUs, GPUs or memory it needs "
        r"are in use by other jobs\); waiting \(Ctrl-C stops waiting",
        60,
    )
    lines.proc.send_signal(signal.SIGINT)
    assert lines.end(30) == 130, "\n".join(lines.lines)
    assert lines.lines[-1] == (
        f"salt: stopped waiting; Slurm job {job_id} stays queued or running (scancel {job_id} "
        "cancels it)"
    ), lines.lines
    assert "Traceback" not in "\n".join(lines.lines)
    assert job_id in queued(job_name)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_cancelled_by_hand_ends_the_wait(
    tmp_path: Path, slurm_cluster: int, job_name: str, start: Callable
) -> None:
    """A job that leaves the queue without a result (here: scancel while it waits) ends the
    wait with one line; without accounting, submitit alone would have waited for ever."""
    lines, job_id = submit_behind_a_full_node(tmp_path, slurm_cluster, job_name, start)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    assert lines.end(120) == 1, "\n".join(lines.lines)
    errors = [line for line in lines.lines if line.startswith("salt: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"salt: error: Slurm job {job_id} ended without a result (cancelled, out of time or "
        "memory, or its node failed); see "
    ), lines.lines
    assert "Traceback" not in "\n".join(lines.lines)
