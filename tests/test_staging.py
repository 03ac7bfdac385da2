"""Staging to a fast disk: copies, cleanup in every ending (real signals to real processes),
concurrent runs, stale copies of dead runs, free space.

The subprocess runs import torch (through ``salt.data.build``), so they are started together
by one module fixture and the tests check their results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml

from salt.data.build import DataFiles
from salt.data.staging import (
    OWNER_FILE,
    PREFIX,
    Owner,
    StagingError,
    remove_stale,
    stage,
)
from tests.conftest import write_ftag_file

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT = 120.0

# A training run, as far as staging is concerned: stage, "train", end in the way asked.
# handlers: "default" (none: stage() alone must clean up), "flag" (a flag-only handler like the
# loop's stop request), "loop" (the loop's real stop request, salt.signals.stop_request, and
# DataFiles; imports torch, slow).
SCRIPT = r"""
import dataclasses, json, logging, signal, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from salt.data.staging import StagingInterrupted, stage

handlers, ending, root, spec = sys.argv[1:5]
spec = json.loads(spec)

if handlers == "loop":
    from salt.data.build import DataFiles
    from salt.signals import stop_request as StopSignal
else:  # DataFiles' fields, without importing torch (a process start costs seconds)
    @dataclasses.dataclass(frozen=True)
    class DataFiles:
        train: list
        val: list
        test: list | None
        norm_dict: Path
        class_dict: Path | None

    class StopSignal:  # what the loop's does: record the signal, raise on a second Ctrl-C
        last = None
        def __enter__(self):
            self.previous = {s: signal.signal(s, self.handle) for s in (2, 15)}
            return self
        def handle(self, signum, frame):
            if self.last is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.last = signum
        def __exit__(self, *exc):
            for s, h in self.previous.items():
                signal.signal(s, h)

files = DataFiles(
    train=[Path(p) for p in spec["train"]], val=[Path(p) for p in spec["val"]],
    test=None, norm_dict=Path(spec["norm_dict"]), class_dict=Path(spec["class_dict"]),
)

def train(staged, stopped):
    same = all(
        s != o and Path(s).read_bytes() == Path(o).read_bytes()
        for s, o in zip([*staged.train, *staged.val, staged.norm_dict, staged.class_dict],
                        [*files.train, *files.val, files.norm_dict, files.class_dict])
    )
    print("staged", staged.train[0], "identical" if same else "DIFFERENT", flush=True)
    if ending in ("normal", "exception"):
        sys.stdin.readline()  # "training" until the test says to end
    if ending == "exception":
        raise RuntimeError("boom in training")
    if ending == "signal":
        while not stopped():
            time.sleep(0.01)

if handlers == "default":
    with stage(files, root) as staged:
        train(staged, lambda: False)
else:  # the loop's handler around the staging, as in fit()
    try:
        with StopSignal() as stop, stage(files, root) as staged:
            train(staged, lambda: stop.last is not None)
            if stop.last is not None:
                sys.exit(128 + stop.last)  # the loop saves, raises Interrupted -> exit
    except StagingInterrupted as err:
        print(f"salt: {err}", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
"""


# ---- helpers ---------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_sources(directory: Path) -> DataFiles:
    directory.mkdir(parents=True, exist_ok=True)
    train = write_ftag_file(directory / "train.h5", n_jets=200, seed=1)
    val = write_ftag_file(directory / "val.h5", n_jets=50, seed=2)
    norm = directory / "norm_dict.yaml"
    norm.write_text(yaml.safe_dump({"jets": {"pt_btagJes": {"mean": 1.0, "std": 2.0}}}))
    cdict = directory / "class_dict.yaml"
    cdict.write_text(yaml.safe_dump({"jets": {"flavour_label": [1.0, 2.0, 3.0]}}))
    return DataFiles([train], [val], None, norm, cdict)


def spec_of(files: DataFiles) -> str:
    return json.dumps(
        {
            "train": [str(p) for p in files.train],
            "val": [str(p) for p in files.val],
            "norm_dict": str(files.norm_dict),
            "class_dict": str(files.class_dict),
        }
    )


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


class Child:
    """A script run as its own process; its output lines are read as they come."""

    def __init__(self, script: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._queues = {"out": queue.Queue(), "err": queue.Queue()}
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out, "out")),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err, "err")),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream: Any, lines: list[str], name: str) -> None:
        for line in stream:
            lines.append(line)
            self._queues[name].put(line)
        self._queues[name].put(None)

    def wait_for(self, text: str, stream: str = "out") -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            line = self._queues[stream].get(timeout=max(deadline - time.monotonic(), 0.01))
            if line is None:
                raise AssertionError(f"the process ended before printing {text!r}:\n{self}")
            if text in line:
                return line

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, stdin: str | None = None) -> int:
        if stdin is not None:
            self.proc.stdin.write(stdin)
            self.proc.stdin.flush()
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=TIMEOUT)
        for t in self._threads:
            t.join(timeout=TIMEOUT)
        return rc

    def __str__(self) -> str:
        return "".join(self.out) + "".join(self.err)


@dataclass
class Outcome:
    rc: int | None = None
    staged_dir: Path | None = None
    root: Path | None = None
    stdout: str = ""
    stderr: str = ""
    error: BaseException | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def check(self) -> Outcome:
        if self.error is not None:
            raise self.error
        return self


def _staged_dir(line: str, root: Path) -> Path:
    """The staging directory from a "staged <train copy> identical" line."""
    path = Path(line.split()[1])
    return root / path.relative_to(root).parts[0]


# ---- the runs, all at once -------------------------------------------------------------------
ENDINGS: dict[str, tuple[str, str, int | None]] = {
    # name: (handlers, ending, signal sent once staged)
    "default-normal": ("default", "normal", None),
    "default-exception": ("default", "exception", None),
    "default-sigint": ("default", "signal", signal.SIGINT),
    "default-sigterm": ("default", "signal", signal.SIGTERM),
    "flag-sigint": ("flag", "signal", signal.SIGINT),
    "flag-sigterm": ("flag", "signal", signal.SIGTERM),
    "loop-sigterm": ("loop", "signal", signal.SIGTERM),
}
DURING_COPY: dict[str, tuple[str, int]] = {
    "copy-default-sigterm": ("default", signal.SIGTERM),
    "copy-default-sigint": ("default", signal.SIGINT),
    "copy-flag-sigterm": ("flag", signal.SIGTERM),
}


def _ending(script: Path, root: Path, spec: str, handlers: str, ending: str, sig: int | None):
    out = Outcome(root=root)
    child = Child(script, handlers, ending, str(root), spec)
    line = child.wait_for("staged")
    out.facts["identical"] = line.rstrip().endswith(" identical")
    out.staged_dir = _staged_dir(line, root)
    out.facts["existed"] = out.staged_dir.is_dir()
    if sig is not None:
        child.send(sig)
    out.rc = child.finish(stdin="\n")
    out.stdout, out.stderr = "".join(child.out), "".join(child.err)
    return out


def _during_copy(script: Path, root: Path, spec: str, handlers: str, sig: int) -> Outcome:
    out = Outcome(root=root)
    child = Child(script, handlers, "signal", str(root), spec)
    child.wait_for("salt: staging", stream="err")  # logged just before the copy starts
    child.send(sig)
    out.rc = child.finish()
    out.stdout, out.stderr = "".join(child.out), "".join(child.err)
    return out


def _concurrent(script: Path, root: Path, spec: str) -> Outcome:
    """Two runs staging into the same root at the same time."""
    out = Outcome(root=root)
    a = Child(script, "default", "normal", str(root), spec)
    b = Child(script, "default", "normal", str(root), spec)
    line_a, line_b = a.wait_for("staged"), b.wait_for("staged")
    dir_a, dir_b = _staged_dir(line_a, root), _staged_dir(line_b, root)
    f = out.facts
    f["dirs"] = (dir_a, dir_b)
    f["identical"] = [x.rstrip().endswith(" identical") for x in (line_a, line_b)]
    f["both_exist"] = dir_a.is_dir() and dir_b.is_dir()
    f["owners"] = [Owner.read(d).pid for d in (dir_a, dir_b)]
    f["pids"] = [a.proc.pid, b.proc.pid]
    f["rc_a"] = a.finish(stdin="\n")  # A ends normally while B still trains
    f["a_gone"] = not dir_a.exists()
    f["b_after_a"] = sorted(str(p.relative_to(dir_b)) for p in dir_b.rglob("*"))
    f["rc_b"] = b.finish(stdin="\n")
    f["b_gone"] = not dir_b.exists()
    return out


def _killed(script: Path, root: Path, spec: str) -> Outcome:
    out = Outcome(root=root)
    child = Child(script, "default", "normal", str(root), spec)
    out.staged_dir = _staged_dir(child.wait_for("staged"), root)
    child.send(signal.SIGKILL)
    out.rc = child.finish()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    base = tmp_path_factory.mktemp("staging_runs")
    script = base / "train_like.py"
    script.write_text(SCRIPT)
    files = make_sources(base / "src")
    spec = spec_of(files)
    # a big (sparse) training file: its copy lasts long enough to be interrupted
    big = base / "big" / "train_big.h5"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(2 * 2**30)
    big_spec = spec_of(replace(files, train=[big]))
    hashes = {p: _sha(p) for p in [*files.train, *files.val, files.norm_dict, files.class_dict]}

    jobs: dict[str, Callable[[], Outcome]] = {}
    for name, (handlers, ending, sig) in ENDINGS.items():
        jobs[name] = lambda n=name, h=handlers, e=ending, s=sig: _ending(
            script, base / n, spec, h, e, s
        )
    for name, (handlers, sig) in DURING_COPY.items():
        jobs[name] = lambda n=name, h=handlers, s=sig: _during_copy(
            script, base / n, big_spec, h, s
        )
    jobs["concurrent"] = lambda: _concurrent(script, base / "concurrent", spec)
    jobs["killed"] = lambda: _killed(script, base / "killed", spec)

    def safe(job: Callable[[], Outcome]) -> Outcome:
        try:
            return job()
        except BaseException as err:  # reported by the test that looks at this run
            return Outcome(error=err)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(safe, job) for name, job in jobs.items()}
        results = {name: fut.result() for name, fut in futures.items()}
    results["sources"] = Outcome(facts={"unchanged": all(_sha(p) == h for p, h in hashes.items())})
    return results


# ---- the four endings ------------------------------------------------------------------------
EXPECTED_RC = {
    "default-normal": 0,
    "default-exception": 1,
    "default-sigint": -signal.SIGINT,  # an unhandled KeyboardInterrupt ends Python by SIGINT
    "default-sigterm": -signal.SIGTERM,  # cleaned up, then the default action
    "flag-sigint": 128 + signal.SIGINT,  # the loop's handler stopped the "training"
    "flag-sigterm": 128 + signal.SIGTERM,
    "loop-sigterm": 128 + signal.SIGTERM,
}


@pytest.mark.parametrize("name", list(ENDINGS))
def test_each_ending_removes_the_copies(runs: dict[str, Outcome], name: str) -> None:
    out = runs[name].check()
    assert out.facts["existed"], "the staged directory did not exist while training"
    assert out.facts["identical"], "the staged files differ from the originals"
    assert out.rc == EXPECTED_RC[name], out.stderr
    assert not out.staged_dir.exists()
    assert leftovers(out.root) == []
    if name.endswith("exception"):
        assert "boom in training" in out.stderr
    assert runs["sources"].facts["unchanged"]


@pytest.mark.parametrize("name", list(DURING_COPY))
def test_a_signal_during_the_copy_removes_the_partial_copy(
    runs: dict[str, Outcome], name: str
) -> None:
    out = runs[name].check()
    assert "staged" not in out.stdout, "the signal came after the copy; the test missed it"
    assert leftovers(out.root) == []
    handlers, sig = DURING_COPY[name]
    if handlers == "flag":  # the loop's handler only records it: StagingInterrupted
        assert out.rc == 128 + sig
        assert "data staging stopped by SIGTERM; the copies were removed" in out.stderr
    elif sig == signal.SIGINT:
        assert out.rc == -signal.SIGINT
        assert "KeyboardInterrupt" in out.stderr
    else:
        assert out.rc == -signal.SIGTERM


def test_concurrent_runs_do_not_collide(runs: dict[str, Outcome]) -> None:
    f = runs["concurrent"].check().facts
    dir_a, dir_b = f["dirs"]
    assert dir_a != dir_b
    assert f["both_exist"]
    assert f["identical"] == [True, True]
    assert f["owners"] == f["pids"]
    assert f["rc_a"] == 0 and f["rc_b"] == 0
    assert f["a_gone"]
    # B's copies were untouched by A's start (stale check) and end (cleanup)
    assert f["b_after_a"] == [
        "0",
        "0/class_dict.yaml",
        "0/norm_dict.yaml",
        "0/train.h5",
        "0/val.h5",
        OWNER_FILE,
    ]
    assert f["b_gone"]
    assert leftovers(runs["concurrent"].root) == []


def test_leftovers_of_a_killed_run_are_removed_by_the_next(
    runs: dict[str, Outcome], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = runs["killed"].check()
    assert out.rc == -signal.SIGKILL
    assert out.staged_dir.is_dir()  # kill -9: nothing could clean up
    files = make_sources(tmp_path / "src")
    with caplog.at_level(logging.INFO, logger="salt"), stage(files, out.root, progress=False):
        assert not out.staged_dir.exists()
    assert f"removing stale staged data {out.staged_dir}" in caplog.text
    assert "is gone" in caplog.text
    assert leftovers(out.root) == []


# ---- in this process -------------------------------------------------------------------------
def test_stage_copies_and_cleans_up(tmp_path: Path) -> None:
    files = make_sources(tmp_path / "src")
    files = replace(files, test=[files.val[0]])
    root = tmp_path / "shm" / "user" / "salt"  # does not exist yet
    with stage(files, root, progress=False) as staged:
        (directory,) = list(root.iterdir())
        assert directory.name.startswith(f"{PREFIX}{os.getpid()}-")
        for copy, orig in zip(
            [*staged.train, *staged.val, staged.norm_dict, staged.class_dict],
            [*files.train, *files.val, files.norm_dict, files.class_dict],
            strict=True,
        ):
            assert copy.is_relative_to(directory)
            assert copy.name == orig.name
            assert copy.read_bytes() == orig.read_bytes()
        assert staged.test == files.test  # test files are not staged
        assert staged.norm_dict.parent == staged.train[0].parent  # still beside the file
        with h5py.File(staged.train[0]) as f:
            assert len(f["jets"]) == 200
        owner = Owner.read(directory)
        assert owner is not None and owner.pid == os.getpid() and not owner.is_gone()
        assert not [p for p in directory.rglob("*") if ".tmp-" in p.name]
    assert leftovers(root) == []
    for d in (tmp_path / "shm", tmp_path / "shm" / "user", root):  # created private
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_same_names_do_not_collide_and_a_file_listed_twice_is_copied_once(
    tmp_path: Path,
) -> None:
    a = make_sources(tmp_path / "a")
    (tmp_path / "b").mkdir()
    b = write_ftag_file(tmp_path / "b" / "train.h5", n_jets=30, seed=5)
    files = replace(a, train=[a.train[0], b], val=[a.train[0]])
    with stage(files, tmp_path / "root", progress=False) as staged:
        assert staged.train[0] != staged.train[1]
        assert staged.train[1].read_bytes() == b.read_bytes()
        assert staged.val == [staged.train[0]]
        copies = [p for p in (tmp_path / "root").rglob("*.h5")]
        assert len(copies) == 2


def test_not_enough_space_is_one_clear_error(tmp_path: Path) -> None:
    files = make_sources(tmp_path / "src")
    root = tmp_path / "root"
    with pytest.raises(StagingError) as info, stage(files, root, margin=2**62):
        pass
    text = str(info.value)
    assert str(root) in text
    assert "not enough free space" in text
    assert "bytes) needed" in text and "bytes) free" in text
    assert leftovers(root) == []


def test_signal_handlers_are_restored(tmp_path: Path) -> None:
    files = make_sources(tmp_path / "src")
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

        def mine(signum: int, frame: object) -> None:  # like the loop's stop request
            pass

        signal.signal(signal.SIGUSR1, mine)
        with stage(files, tmp_path / "root", progress=False):
            # nobody handled SIGTERM: staging does, so it can clean up
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            # handlers somebody installed are theirs again once the copy is done
            assert signal.getsignal(signal.SIGUSR1) is mine
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_stage_from_another_thread(tmp_path: Path) -> None:
    files = make_sources(tmp_path / "src")
    seen: list[bool] = []

    def work() -> None:
        with stage(files, tmp_path / "root", progress=False) as staged:
            seen.append(staged.train[0].is_file())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [True]
    assert leftovers(tmp_path / "root") == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_stage_dir(root: Path, name: str, owner: Owner | None) -> Path:
    d = root / name
    (d / "0").mkdir(parents=True)
    (d / "0" / "train.h5").write_bytes(b"x" * 100)
    if owner is not None:
        owner.write(d)
    return d


def test_stale_copies_are_removed_live_ones_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    me = Owner.current()
    dead = replace(me, pid=_dead_pid())
    reused = replace(me, start_ticks=(me.start_ticks or 0) + 1)  # my pid, another process
    rebooted = replace(me, pid=_dead_pid(), boot_id="not-this-boot")
    elsewhere = replace(dead, hostname=me.hostname + "-other")
    gone = {
        "dead": _fake_stage_dir(root, f"{PREFIX}{dead.pid}-aaaa", dead),
        "reused": _fake_stage_dir(root, f"{PREFIX}{me.pid}-bbbb", reused),
        "rebooted": _fake_stage_dir(root, f"{PREFIX}{rebooted.pid}-cccc", rebooted),
        "unowned-old": _fake_stage_dir(root, f"{PREFIX}1-dddd", None),
        "trash": _fake_stage_dir(root, f".{PREFIX}1-eeee.removing", None),
    }
    old = time.time() - 2 * 3600
    os.utime(gone["unowned-old"], (old, old))
    kept = {
        "live": _fake_stage_dir(root, f"{PREFIX}{me.pid}-ffff", me),
        "other-host": _fake_stage_dir(root, f"{PREFIX}{elsewhere.pid}-gggg", elsewhere),
        "unowned-new": _fake_stage_dir(root, f"{PREFIX}2-hhhh", None),
        "not-ours": _fake_stage_dir(root, "my-own-files", dead),
    }
    (root / "notes.txt").write_text("not a staging directory")

    with caplog.at_level(logging.INFO, logger="salt"):
        removed = remove_stale(root)
    assert sorted(removed) == sorted(d for k, d in gone.items() if k != "trash")
    for d in gone.values():
        assert not d.exists()
    for d in kept.values():
        assert (d / "0" / "train.h5").is_file()
    assert (root / "notes.txt").is_file()
    assert leftovers(root) == sorted([*(d.name for d in kept.values()), "notes.txt"])
    assert f"removing stale staged data {gone['dead']}" in caplog.text
    assert f"its process {dead.pid} on {me.hostname}" in caplog.text
    assert "no owner file, last changed 2.0 h ago" in caplog.text


def test_stage_removes_stale_copies_first(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stale = _fake_stage_dir(root, f"{PREFIX}1-zzzz", replace(Owner.current(), pid=_dead_pid()))
    files = make_sources(tmp_path / "src")
    with stage(files, root, progress=False):
        assert not stale.exists()


def test_virtual_datasets_are_read_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = make_sources(tmp_path / "src")
    source = files.train[0]
    vds = tmp_path / "src" / "merged.h5"
    with h5py.File(source) as f:
        shape, dtype = f["jets"].shape, f["jets"].dtype
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    layout[:] = h5py.VirtualSource(str(source), "jets", shape=shape)
    with h5py.File(vds, "w") as f:
        f.create_virtual_dataset("jets", layout)
    files = replace(files, train=[vds])
    with (
        caplog.at_level(logging.WARNING, logger="salt"),
        stage(files, tmp_path / "root", progress=False) as staged,
    ):
        assert staged.train == [vds]
        assert staged.val[0] != files.val[0]  # the others are staged
        with h5py.File(staged.train[0]) as f:
            assert np.array_equal(f["jets"]["pt_btagJes"], np.arange(200))
    assert "virtual datasets" in caplog.text and str(vds) in caplog.text
