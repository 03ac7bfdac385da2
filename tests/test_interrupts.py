"""Stop signals sent to real `python -m salt.train` and `python -m salt.evaluate` processes:
one line on stderr saying what was kept, no traceback, exit 128 + the signal, no partial file,
and the named checkpoint continues the run.

The first Ctrl-C (or SIGTERM) asks a training for a stop at the next step boundary, with a
checkpoint; a second Ctrl-C stops at once, wherever it lands (in a step, in the checkpoint
write, in the sample writer during set-up)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from salt.training import checkpoint as ckpt
from salt.training.kept import Kept
from salt.utils.atomic import is_temp_name
from tests.conftest import TrainedRun, copy_run, logged_step
from tests.test_crash import resume_and_compare
from tests.test_train import TINY, env, run_dirs, weights

KEPT = re.compile(
    r"the last complete checkpoint is (?P<path>\S+) \(step (?P<step>\d+)\): "
    r"continue with resume=(?P<run_dir>\S+)$"
)


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    # a session of its own: the test signals its process group, as a terminal's Ctrl-C does
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# A double Ctrl-C at a terminal: two key presses. Sent closer together, the second would only
# merge with the first while it is pending (the kernel keeps one of each signal).
DOUBLE_TAP_S = 0.1


def twice(proc: subprocess.Popen, signum: int) -> None:
    os.killpg(proc.pid, signum)
    time.sleep(DOUBLE_TAP_S)
    os.killpg(proc.pid, signum)


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 180
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{what} did not happen in time"
        time.sleep(0.005)


def the_line(proc: subprocess.Popen, code: int) -> str:
    """The one line the process ended with (it must end with ``code`` and print nothing else
    of its own)."""
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # a SIGTERM that comes once the process is ending ends it by the signal (a shell shows 143)
    assert proc.returncode == code or (code == 143 and proc.returncode == -15), err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("salt")]
    assert len(lines) == 1, err
    return lines[0]


def writing_in_ckpts(runs: Path) -> bool:
    """A file being written (a checkpoint, predictions) in a run directory under ``runs``."""
    return any(is_temp_name(p.name) for p in runs.glob("*/ckpts/*"))


def trained_run_command(run: TrainedRun, logs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "salt.train", *run.overrides, f"log_dir={logs}", *extra]


@pytest.mark.slow
def test_ctrl_c_twice_names_the_last_checkpoint_and_resume_continues(
    tmp_path: Path, trained_run: TrainedRun
) -> None:
    """The trained run again, Ctrl-C after step 12, and again as soon as the stop's checkpoint
    is being written (a file of a few hundred kB: the second may land just after it, or once
    the process is ending, when a third would be ignored). Either way: one line naming a
    complete checkpoint, and resuming it ends with the uninterrupted run's weights."""
    logs = tmp_path / "logs"
    proc = start(trained_run_command(trained_run, logs), tmp_path)
    wait_for(proc, lambda: any(logged_step(d) >= 12 for d in logs.glob("*")), "step 12")
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 5  # the periodic checkpoints are every 10 steps: this is it
    while not writing_in_ckpts(logs) and proc.poll() is None and time.monotonic() < deadline:
        pass
    os.killpg(proc.pid, signal.SIGINT)
    line = the_line(proc, 128 + signal.SIGINT)
    assert re.match(r"salt: (interrupted again|stopped by signal 2 \(SIGINT\)) at step ", line)
    kept = KEPT.search(line)
    assert kept is not None, line
    (run_dir,) = run_dirs(tmp_path)
    assert Path(kept["run_dir"]) == run_dir
    assert Path(kept["path"]) == run_dir / "ckpts" / ckpt.LAST
    state = ckpt.load_checkpoint(kept["path"])
    assert state["counters"]["step"] == int(kept["step"]) >= 10
    assert not [p for p in (run_dir / "ckpts").iterdir() if is_temp_name(p.name)]
    expected = weights(trained_run.run_dir / "ckpts" / ckpt.LAST)
    resume_and_compare(tmp_path, trained_run, run_dir, expected)


@pytest.mark.slow
def test_sigterm_twice_saves_once_and_names_the_checkpoint(
    tmp_path: Path, trained_run: TrainedRun
) -> None:
    """Slurm's cancel twice (scancel, then the job's end): the second SIGTERM only repeats the
    stop request; the checkpoint of the stop is written and named."""
    logs = tmp_path / "logs"
    proc = start(trained_run_command(trained_run, logs), tmp_path)
    wait_for(proc, lambda: any(logged_step(d) >= 12 for d in logs.glob("*")), "step 12")
    twice(proc, signal.SIGTERM)
    line = the_line(proc, 128 + signal.SIGTERM)
    match = re.fullmatch(r"salt: stopped by signal 15 \(SIGTERM\) at step (\d+); .*", line)
    assert match is not None, line
    kept = KEPT.search(line)
    assert kept is not None and kept["step"] == match[1], line
    assert ckpt.load_checkpoint(kept["path"])["counters"]["step"] == int(kept["step"])


@pytest.mark.slow
def test_ctrl_c_twice_while_the_sample_is_written(tmp_path: Path) -> None:
    """Set-up, before the run directory exists: the built-in sample is being written. Nothing
    is left: no run directory, no part of the sample."""
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    cmd = [
        sys.executable,
        "-m",
        "salt.train",
        *TINY,
        "data.sample.num_jets=100000",  # a few seconds of writing
        f"data.sample.dir={cache}",
        f"log_dir={logs}",
    ]
    proc = start(cmd, tmp_path)
    wait_for(proc, lambda: any(cache.glob(".*.tmp-*")), "the sample writing")
    twice(proc, signal.SIGINT)
    line = the_line(proc, 128 + signal.SIGINT)
    assert line == "salt: interrupted again during set-up; nothing was saved: start the run again"
    assert not logs.exists()
    assert list(cache.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_twice_under_ddp(tmp_path: Path, sample_cache: Path) -> None:
    """trainer.devices=2 on one node: the terminal's Ctrl-C reaches the spawning process and
    both ranks. Rank 0 alone says what was kept; the spawning process adds nothing."""
    logs = tmp_path / "logs"
    cmd = [
        sys.executable,
        "-m",
        "salt.train",
        *TINY,
        f"data.sample.dir={sample_cache}",
        f"log_dir={logs}",
        "logger=local",
        "logger.log_every_n_steps=1",
        "trainer.max_epochs=5",  # 6 steps each
        "trainer.devices=2",
        "trainer.accelerator=cpu",
    ]
    proc = start(cmd, tmp_path)
    # after step 13: the ranks agree on a stop every 10 steps, so the second Ctrl-C comes
    # before the stop's checkpoint (step 20); the last one is the second epoch's (step 12)
    wait_for(proc, lambda: any(logged_step(d) >= 13 for d in logs.glob("*")), "step 13")
    twice(proc, signal.SIGINT)
    line = the_line(proc, 128 + signal.SIGINT)
    before = r"salt: interrupted again at step (\d+) before the checkpoint was written; "
    match = re.match(before, line)
    assert match is not None, line
    kept = KEPT.search(line)
    assert kept is not None and kept["step"] == "12" and int(match[1]) > 12, line
    assert ckpt.load_checkpoint(kept["path"])["counters"]["step"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_evaluation_leaves_no_partial_file(
    tmp_path: Path, trained_run: TrainedRun, signum: int
) -> None:
    """`python -m salt.evaluate` stopped while it writes the predictions (Ctrl-C, or Slurm's
    cancel, which used to leave the temporary file, as large as the predictions)."""
    from salt.data.build import ensure_sample

    run_dir = copy_run(trained_run.run_dir, tmp_path / "runs")
    test_file = ensure_sample(tmp_path / "cache", 100_000, 7) / "test.h5"  # 25000 jets
    cmd = [
        sys.executable,
        "-m",
        "salt.evaluate",
        f"run_dir={run_dir}",
        f"data.test_file={test_file}",
        "data.batch_size=10",  # 2500 batches: seconds of writing
        "progress_bar=false",
    ]
    proc = start(cmd, tmp_path)
    predictions = run_dir / "ckpts"
    wait_for(
        proc,
        lambda: any(is_temp_name(p.name) and "__test_" in p.name for p in predictions.iterdir()),
        "the predictions' writing",
    )
    os.killpg(proc.pid, signum)
    line = the_line(proc, 128 + signum)
    how = "interrupted" if signum == signal.SIGINT else "stopped by signal 15 (SIGTERM)"
    assert line == (
        f"salt: {how}; no output was written (earlier results unchanged): run the evaluation again"
    )
    assert sorted(p.name for p in (run_dir / "ckpts").iterdir()) == sorted(
        p.name for p in (trained_run.run_dir / "ckpts").iterdir()
    )


def test_the_line_names_what_to_continue_from(tmp_path: Path) -> None:
    """The command that continues: resume=<run dir> for a run's checkpoint, ckpt_path= for a
    file elsewhere; nothing to continue from before the first checkpoint."""
    run_dir = tmp_path / "GN2_x"
    (run_dir / "ckpts").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}")
    kept = Kept(run_dir=run_dir)
    assert kept.interrupted(None, again=False) == (
        f"interrupted during set-up; nothing was saved (no checkpoint yet): remove {run_dir} "
        "and start again"
    )
    kept.saved(run_dir / "ckpts" / "last.ckpt", 30)
    kept.saving = True
    assert kept.interrupted(37, again=True) == (
        f"interrupted again at step 37 during the checkpoint write (dropped); the last complete "
        f"checkpoint is {run_dir}/ckpts/last.ckpt (step 30): continue with resume={run_dir}"
    )
    kept.saved(tmp_path / "model.ckpt", 5)  # started from a file outside a run directory
    line = kept.stopped(signal.SIGTERM, 5)
    assert line.endswith(f"(step 5): continue with ckpt_path={tmp_path}/model.ckpt")
    assert Kept().stopped(signal.SIGINT, 0) == (
        "stopped by signal 2 (SIGINT) before the first step; nothing was saved: start the run again"
    )
