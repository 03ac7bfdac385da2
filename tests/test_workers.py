"""DataLoader worker count and options: CPU limits from affinity and Slurm, the warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from salt.data.build import DataConfig
from salt.data.ftag import DataError
from salt.data.workers import (
    NumWorkersWarning,
    available_cpus,
    cpu_limits,
    loader_options,
    resolve_num_workers,
)
from salt.errors import ConfigError

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run inside Slurm jobs too: start from no Slurm allocation."""
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        monkeypatch.delenv(var, raising=False)


def _no_warnings(value: int | str, **kwargs: object) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return resolve_num_workers(value, **kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_affinity_limits_cpus_and_warns_in_a_pinned_process() -> None:
    script = """
import json, os, warnings
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
from salt.data.workers import available_cpus, resolve_num_workers
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    n = resolve_num_workers(3, on_gpu=True)
print(json.dumps({"cpus": available_cpus(), "n": n, "warnings": [str(w.message) for w in caught]}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["cpus"] == 1
    assert result["n"] == 3  # a warning, not a change: the user asked for 3
    assert len(result["warnings"]) == 1
    text = result["warnings"][0]
    assert "data.num_workers=3 exceeds the 1 CPUs" in text
    assert "CPU affinity 1" in text


def test_slurm_allocation_limits_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpu_limits()["SLURM_CPUS_PER_TASK"] == 1
    assert available_cpus() == 1
    with pytest.warns(NumWorkersWarning, match=r"num_workers=2 exceeds the 1 CPUs") as rec:
        assert resolve_num_workers(2, on_gpu=False) == 2
    assert "SLURM_CPUS_PER_TASK 1" in str(rec[0].message)


def test_slurm_cpus_on_node_counts_and_bad_values_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")  # set but empty: not a limit
    assert "SLURM_CPUS_PER_TASK" not in cpu_limits()
    assert available_cpus() == 1


def test_within_the_cpus_no_warning() -> None:
    cpus = available_cpus()
    assert _no_warnings(cpus, on_gpu=False) == cpus
    assert _no_warnings(0, on_gpu=False) == 0  # CPU run: loading in the training process is fine
    assert _no_warnings(1, on_gpu=True) == 1


@pytest.mark.skipif(available_cpus() < 2, reason="needs 2 CPUs to share")
def test_ranks_sharing_the_cpus_share_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(min(available_cpus(), 4)))
    cpus = available_cpus()
    assert _no_warnings(cpus, on_gpu=True, world_size=1) == cpus
    with pytest.warns(NumWorkersWarning, match=f"shared by {cpus} ranks"):
        resolve_num_workers(2, on_gpu=True, world_size=cpus)


def test_zero_workers_on_gpu_warns() -> None:
    with pytest.warns(NumWorkersWarning, match=r"num_workers=0 on a GPU run"):
        assert resolve_num_workers(0, on_gpu=True) == 0


def test_auto_uses_the_cpus_available(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = available_cpus()
    # GPU: all cores but the training process's, at most 8
    expected = min(max(cpus - 1, 0), 8)
    if expected > 0:
        assert _no_warnings("auto", on_gpu=True) == expected
    # CPU: the model's threads need the cores; no workers below 4 CPUs
    assert _no_warnings("auto", on_gpu=False) == (0 if cpus < 4 else min(cpus // 4, 2))
    assert _no_warnings("AUTO", on_gpu=False) == _no_warnings("auto", on_gpu=False)

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    with pytest.warns(NumWorkersWarning, match=r"only 1 CPU per rank"):
        assert resolve_num_workers("auto", on_gpu=True) == 0


@pytest.mark.parametrize("bad", [-1, "-2", "many", 2.5, True, None])
def test_bad_values_raise_one_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"data\.num_workers=.*non-negative integer or 'auto'"):
        resolve_num_workers(bad, on_gpu=False)  # type: ignore[arg-type]
    assert issubclass(DataError, ValueError)


def test_numeric_strings_are_accepted() -> None:
    assert _no_warnings("0", on_gpu=False) == 0


def options(cfg: dict, on_gpu: bool) -> dict:
    return loader_options(DataConfig.read(cfg), on_gpu=on_gpu)


def test_loader_options() -> None:
    assert options({}, on_gpu=True) == {
        "persistent_workers": False,
        "prefetch_factor": None,
        "pin_memory": True,
    }
    assert options({"pin_memory": "auto"}, on_gpu=False)["pin_memory"] is False
    assert options({"pin_memory": True}, on_gpu=False)["pin_memory"] is False
    assert options({"pin_memory": False}, on_gpu=True)["pin_memory"] is False
    opts = options({"persistent_workers": True, "prefetch_factor": 4}, on_gpu=False)
    assert opts["persistent_workers"] is True
    assert opts["prefetch_factor"] == 4


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"prefetch_factor": 0}, "prefetch_factor"),
        ({"prefetch_factor": "two"}, "prefetch_factor"),
        ({"pin_memory": "yes"}, "pin_memory"),
        ({"persistent_workers": "maybe"}, "persistent_workers"),
        ({"num_workers": "many"}, "num_workers"),
        ({"num_workers": -2}, "num_workers"),
    ],
)
def test_loader_options_bad_values(cfg: dict, key: str) -> None:
    """Wrong types and ranges are one ConfigError naming the key when the data node is read
    (strings OmegaConf converts exactly, such as "2" or "true", are that value)."""
    with pytest.raises(ConfigError, match=rf"data\.{key}"):
        DataConfig.read(cfg)
