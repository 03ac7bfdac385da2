"""scripts/device_check.sh --cpu: every step of the GPU check runs at tiny sizes, so the one
chance on a GPU is not lost to a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = (
    "environment",
    "tests marked cuda",
    "write a 4000-jet sample",
    "training throughput: every attention backend, eager and compiled",
    "loader throughput",
    "train GN2 with python -m salt.train (20 steps)",
    "evaluate it with python -m salt.evaluate",
)


@pytest.mark.slow
def test_device_check_runs_every_step_in_cpu_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/device_check.sh"), "--cpu", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    report = (tmp_path / "out" / "device_report.md").read_text()
    assert proc.returncode == 0, report + proc.stderr
    assert "- every step passed" in report
    for title in STEPS:
        assert f"## {title}\n" in report, title
    assert report.count("- exit status 0 after") == len(STEPS)
    bench = json.loads((tmp_path / "out" / "bench_train.json").read_text())
    assert [r["variant"] for r in bench] == [
        f"{b}{c}" for b in ("packed", "varlen", "padded") for c in ("", "+compile")
    ]
    assert all("error" not in r and r["jets_per_s"] > 0 for r in bench)
    assert "b-eff" in report and "light rej" in report  # the evaluation's table
    # the script's scratch space is gone
    assert not list(tmp_path.glob("salt_device_check.*"))


def test_device_check_rejects_unknown_arguments(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/device_check.sh"), "--gpu"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown argument --gpu" in proc.stderr
