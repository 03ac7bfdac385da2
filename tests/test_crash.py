"""Crash safety with real processes: SIGKILL at random steps and during a checkpoint write,
a full disk during a checkpoint write, and DataLoader workers that die with their trainer.

Every run here is the session's trained run (tests/conftest.py) again, with its command line:
its final weights are what each crashed-and-resumed run must end with."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from salt.errors import run_entry_point
from salt.train import train
from salt.training import checkpoint as ckpt
from salt.utils.atomic import is_temp_name
from tests.conftest import (
    TRAINED_RUN_STEPS,
    TrainedRun,
    copy_run,
    logged_step,
    small_tmpfs,
)
from tests.test_train import assert_bitwise_equal, env, run_dirs, weights

pytestmark = pytest.mark.slow

# the trained run: 30 steps per epoch, 2 epochs, a checkpoint every 10 steps; its local logger
# writes (and flushes) a row every step
EVERY = 10  # checkpoint interval (steps)
TOTAL_STEPS = TRAINED_RUN_STEPS
# kill steps drawn once, printed in the test ids, the same on every run of the suite
KILL_STEPS = sorted(random.Random(20261125).sample(range(EVERY + 1, TOTAL_STEPS - 3), 3))
POLL_S = 0.01  # how often a waiting test looks at the files of the process it waits for


@pytest.fixture(scope="module")
def reference(trained_run: TrainedRun) -> tuple[TrainedRun, dict]:
    """The trained run, uninterrupted: the weights every crashed-and-resumed run must end with
    (read only: the tests run it again in their own directories)."""
    assert f"trainer.ckpt_every_n_steps={EVERY}" in trained_run.overrides
    return trained_run, weights(trained_run.run_dir / "ckpts" / "last.ckpt")


def start(tmp_path: Path, run: TrainedRun, *extra: str) -> subprocess.Popen:
    overrides = [*run.overrides, f"log_dir={tmp_path / 'logs'}"]
    return subprocess.Popen(
        [sys.executable, "-m", "salt.train", *overrides, *extra],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(proc: subprocess.Popen, logs: Path, ready: Callable[[Path], bool]) -> Path:
    """SIGKILL ``proc`` as soon as ``ready(run_dir)``; returns the run directory."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        dirs = [p for p in logs.glob("*") if (p / "config.yaml").exists()] if logs.exists() else []
        if dirs and ready(dirs[0]):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return dirs[0]
        if proc.poll() is not None:
            pytest.fail(f"training ended before the kill point: {proc.stderr.read()}")
        time.sleep(POLL_S)
    proc.kill()
    pytest.fail("kill point not reached in time")


def temp_files(ckpt_dir: Path) -> list[str]:
    return [p.name for p in ckpt_dir.iterdir() if is_temp_name(p.name)]


def resume_and_compare(tmp_path: Path, run: TrainedRun, killed: Path, expected: dict) -> None:
    before = set(run_dirs(tmp_path))
    train(run.compose(tmp_path / "logs", f"resume={killed}"))
    (resumed,) = set(run_dirs(tmp_path)) - before
    state = ckpt.load_checkpoint(resumed / "ckpts" / "last.ckpt")
    assert state["counters"]["step"] == TOTAL_STEPS
    assert_bitwise_equal(expected, state["model"])


@pytest.mark.parametrize("kill_step", KILL_STEPS)
def test_sigkill_at_a_random_step_resumes_bitwise(
    tmp_path: Path, reference: tuple[TrainedRun, dict], kill_step: int
) -> None:
    run, expected = reference
    proc = start(tmp_path, run)
    killed = kill_when(proc, tmp_path / "logs", lambda d: logged_step(d) >= kill_step)
    assert proc.returncode == -signal.SIGKILL
    done = logged_step(killed)  # the process may have gone a little further than asked
    latest = ckpt.latest_checkpoint(killed / "ckpts")
    saved = ckpt.load_checkpoint(latest)["counters"]["step"] if latest else 0
    assert 0 <= done - saved <= EVERY, (done, saved)  # at most one checkpoint interval lost
    resume_and_compare(tmp_path, run, killed, expected)


def test_sigkill_during_a_checkpoint_write_resumes_bitwise(
    tmp_path: Path, reference: tuple[TrainedRun, dict]
) -> None:
    run, expected = reference
    # every step writes a checkpoint here, so the kill can land inside one; it is made to, by
    # killing the moment a temporary checkpoint file shows up, and the test checks it did
    for _attempt in range(5):
        attempt_dir = tmp_path / f"attempt{_attempt}"
        attempt_dir.mkdir()
        proc = start(attempt_dir, run, "trainer.ckpt_every_n_steps=1")
        killed = kill_when(
            proc,
            attempt_dir / "logs",
            lambda d: (d / "ckpts" / ckpt.LAST).exists() and bool(temp_files(d / "ckpts")),
        )
        if temp_files(killed / "ckpts"):
            break  # the write was cut: a partial temporary file is what the kill left
    else:
        pytest.fail("no kill landed inside a checkpoint write in 5 attempts")
    latest = ckpt.latest_checkpoint(killed / "ckpts")
    assert latest is not None and not is_temp_name(latest.name)
    ckpt.load_checkpoint(latest)  # complete: every file under a final name is
    resume_and_compare(attempt_dir, run, killed, expected)


# ---- full disk --------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk", "16m") as mount_point:
        yield mount_point


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` (another job's output, say) until only ``leave`` bytes are free."""
    filler = disk / "other_job_output.bin"
    free = shutil.disk_usage(disk).free
    with filler.open("ab") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path,
    small_disk: Path,
    reference: tuple[TrainedRun, dict],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, expected = reference
    logs = small_disk / "logs"
    first = copy_run(run.run_dir, logs)  # a finished run on the small disk
    (epoch0,) = (first / "ckpts").glob("epoch=000-*.ckpt")
    size = (first / "ckpts" / ckpt.LAST).stat().st_size
    # the disk fills up (another job, say) until one and a half checkpoints fit: a run resumed
    # from epoch 0 (step 30) saves at step 40, then cannot write its step-50 checkpoint
    filler = fill(small_disk, leave=size * 3 // 2)
    # the run's saved config.yaml with a checkpoint, as `--config-dir <run> --config-name
    # config` composes it (the command line's one-line format: test_bad_inputs)
    with initialize_config_dir(config_dir=str(first), version_base=None):
        cfg = compose("config", overrides=[f"ckpt_path='{epoch0}'", f"log_dir={logs}"])
    with pytest.raises(SystemExit) as stop:
        run_entry_point(train, cfg)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("salt: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    (failed,) = set(run_dirs_under(logs)) - {first}
    last = failed / "ckpts" / ckpt.LAST
    assert "training stopped at step 50" in errors[0]
    assert "No space left on device" in errors[0] and "MiB free" in errors[0]
    # it names what is safe and how to continue
    assert f"continue from {last} with resume={failed}" in errors[0]
    # the previous checkpoint is intact and complete; no half-written file holds the space
    assert ckpt.load_checkpoint(last)["counters"]["step"] == 40
    assert temp_files(failed / "ckpts") == []
    assert weights(first / "ckpts" / ckpt.LAST).keys() == expected.keys()
    # space freed: the run continues from its last complete checkpoint, nothing else lost
    filler.unlink()
    train(run.compose(tmp_path / "logs", f"resume={failed}"), overrides=[])
    (resumed,) = set(run_dirs_under(logs)) - {first, failed}
    assert_bitwise_equal(expected, weights(resumed / "ckpts" / ckpt.LAST))


def test_full_disk_stops_every_ddp_rank(
    tmp_path: Path, small_disk: Path, reference: tuple[TrainedRun, dict]
) -> None:
    """Two ranks started as torchrun or srun start them (nothing kills the other rank when one
    fails): rank 0 cannot write its first checkpoint, and both stop instead of rank 1 waiting
    for rank 0 forever."""
    from salt.training.distributed import _free_port

    run, _ = reference
    logs = small_disk / "logs"
    size = (run.run_dir / "ckpts" / ckpt.LAST).stat().st_size
    assert size > 60_000  # a checkpoint does not fit in what is left
    fill(small_disk, leave=60_000)  # the run's files fit, a checkpoint does not
    launch = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    overrides = [*run.overrides, f"log_dir={logs}"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "salt.train", *overrides, "trainer.devices=2"],
            cwd=tmp_path,
            env={**env(), **launch, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        errs = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, err) in enumerate(zip(procs, errs, strict=True)):
        assert p.returncode == 1, (r, err)
        assert "training stopped at step 10: could not write checkpoint" in err, err
        assert "No space left on device" in err and "Traceback" not in err, err
    (run_dir,) = run_dirs_under(logs)
    assert list((run_dir / "ckpts").iterdir()) == []  # no partial file holds the space


def run_dirs_under(logs: Path) -> list[Path]:
    return sorted(p for p in logs.iterdir() if (p / "config.yaml").exists())


# ---- DataLoader workers -----------------------------------------------------------------------
def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_dataloader_workers_die_with_a_killed_trainer(
    tmp_path: Path, reference: tuple[TrainedRun, dict]
) -> None:
    run, _ = reference
    proc = start(
        tmp_path,
        run,
        "data.num_workers=2",
        "data.persistent_workers=true",
        "trainer.max_epochs=50",
    )
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    while time.monotonic() < deadline and len(workers) < 2:
        workers = {p for p in children(proc.pid) if alive(p)}
        time.sleep(POLL_S)
    assert len(workers) >= 2, proc.stderr.read() if proc.poll() is not None else "no workers"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 2  # torch's own watchdog alone would take ~5 s
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(POLL_S)
    stray = [p for p in workers if alive(p)]
    for p in stray:
        os.kill(p, signal.SIGKILL)
    assert not stray, f"DataLoader workers {stray} outlived the killed trainer"
