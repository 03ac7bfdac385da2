"""Experiment tracking: local metrics file and plots, comet offline archives, the factory."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from salt.tracking import LoggerConfigError, MultiLogger, NullLogger, build_logger
from salt.tracking.comet import CometLogger, flatten
from salt.tracking.metrics import METRICS_FILE, LocalLogger, read_rows

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "logger"
FAKE_KEY = "fake-secret-1234567890"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def log_two_epochs(logger, tasks=("jets", "track_origin")) -> None:
    """What the loop logs: train rows every few steps, validation rows at each epoch end."""
    step = 0
    for epoch in range(2):
        for _ in range(3):
            step += 10
            metrics = {"train/loss": 1.0 / step, "train/lr": 1e-3 * step, "train/jets_per_s": 5e3}
            metrics.update({f"train/{t}_loss": 0.5 / step for t in tasks})
            logger.log_metrics(metrics, step=step)
        val = {"val/loss": 0.9 - epoch * 0.1, "val/jet_accuracy": 0.6 + 0.1 * epoch, "epoch": epoch}
        val.update({f"val/{t}_loss": 0.4 - epoch * 0.1 for t in tasks})
        logger.log_metrics(val, step=step, epoch=epoch)
        logger.on_epoch_end(epoch)


def read_archive(run_dir: Path) -> tuple[Path, dict, list[dict]]:
    """The single comet archive under run_dir: (path, experiment.json, messages)."""
    zips = sorted((run_dir / "comet").glob("*.zip"))
    assert len(zips) == 1, zips
    with zipfile.ZipFile(zips[0]) as zf:
        experiment = json.loads(zf.read("experiment.json"))
        messages = [json.loads(line) for line in zf.read("messages.json").splitlines() if line]
    return zips[0], experiment, messages


def by_type(messages: list[dict], kind: str) -> list[dict]:
    return [m["payload"] for m in messages if m["type"] == kind]


# --- local logger ------------------------------------------------------------------------------


def test_local_rows_are_json_lines_with_step_epoch_time(tmp_path: Path) -> None:
    logger = LocalLogger(tmp_path)
    logger.log_metrics({"train/loss": 0.5, "train/lr": 1e-3}, step=50)
    logger.log_metrics({"val/loss": 0.25, "val/jet_accuracy": 0.75, "epoch": 0}, step=100)
    logger.log_metrics({"train/loss": float("nan")}, step=150, epoch=1)
    # Flushed per call: the file on disk has every row before finalize.
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 100, 150]
    assert [r["epoch"] for r in rows] == [None, 0, 1]  # the "epoch" metric fills the column
    assert rows[0]["train/loss"] == 0.5 and rows[0]["train/lr"] == 1e-3
    assert rows[1]["val/jet_accuracy"] == 0.75 and "train/loss" not in rows[1]
    assert rows[2]["train/loss"] is None  # NaN is not JSON
    assert all(isinstance(r["time"], float) for r in rows)
    assert rows[0]["time"] <= rows[2]["time"]
    logger.finalize()
    logger.finalize()  # idempotent
    with pytest.raises(RuntimeError, match="after finalize"):
        logger.log_metrics({"train/loss": 1.0}, step=200)


def test_local_rejects_reserved_and_non_numeric_metrics(tmp_path: Path) -> None:
    logger = LocalLogger(tmp_path)
    with pytest.raises(ValueError, match="'step' is reserved"):
        logger.log_metrics({"step": 3.0}, step=3)
    with pytest.raises(ValueError, match="metric 'train/loss': expected a number"):
        logger.log_metrics({"train/loss": "high"}, step=3)
    logger.finalize()


def test_rows_survive_a_killed_process(tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from salt.tracking.metrics import LocalLogger\n"
        "logger = LocalLogger(Path(sys.argv[1]))\n"
        "for step in range(1, 4):\n"
        "    logger.log_metrics({'train/loss': 1.0 / step}, step=step)\n"
        "os._exit(1)  # no finalize, no interpreter clean-up\n"
    )
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, check=False)
    assert proc.returncode == 1
    rows = read_rows(tmp_path / METRICS_FILE)
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_plots_written_at_epoch_end(tmp_path: Path) -> None:
    logger = LocalLogger(tmp_path)
    logger.log_metrics({"train/loss": 1.0, "train/jets_loss": 0.5}, step=10)
    assert not (tmp_path / "plots").exists()  # only at epoch end
    logger.finalize()
    logger = LocalLogger(tmp_path / "run")
    log_two_epochs(logger)
    plots = sorted(p.name for p in (tmp_path / "run" / "plots").iterdir())
    assert plots == ["accuracy.png", "loss.png", "lr.png"]  # and no temp files left behind
    for name in plots:
        data = (tmp_path / "run" / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5_000, name  # axes, lines and labels, not an empty canvas
    logger.finalize()


def test_plots_off(tmp_path: Path) -> None:
    logger = LocalLogger(tmp_path, plots=False)
    log_two_epochs(logger)
    logger.finalize()
    assert not (tmp_path / "plots").exists()
    assert len(read_rows(tmp_path / METRICS_FILE)) == 8


def test_resume_copies_history_up_to_the_checkpoint(tmp_path: Path) -> None:
    first = LocalLogger(tmp_path / "run1")
    log_two_epochs(first)
    saved = first.state_dict()  # what the checkpoint holds
    assert saved == {
        "metrics_file": str((tmp_path / "run1" / METRICS_FILE).resolve()),
        "metrics_rows": 8,
    }
    first.log_metrics({"train/loss": 9.0}, step=70)  # after the checkpoint: to be dropped
    first.finalize()

    second = LocalLogger(tmp_path / "run2", resume_state=saved)
    second.log_metrics({"train/loss": 0.01}, step=70)
    second.on_epoch_end(2)
    second.finalize()
    old = read_rows(tmp_path / "run1" / METRICS_FILE)
    new = read_rows(tmp_path / "run2" / METRICS_FILE)
    assert len(old) == 9
    assert new[:8] == old[:8]
    assert [r["step"] for r in new[8:]] == [70] and new[8]["train/loss"] == 0.01
    assert second.state_dict()["metrics_rows"] == 9
    assert (tmp_path / "run2" / "plots" / "loss.png").stat().st_size > 5_000


def test_resume_history_file_missing_or_truncated(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        logger = LocalLogger(tmp_path / "a", resume_state={"metrics_file": tmp_path / "gone.jsonl"})
    assert "gone.jsonl" in caplog.text and logger.rows == []
    logger.finalize()
    # A crash mid-write leaves a partial last line: it is skipped, the rest is kept.
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/lo')
    logger = LocalLogger(tmp_path / "b", resume_state={"metrics_file": broken})
    logger.log_metrics({"train/loss": 0.5}, step=2)
    logger.finalize()
    assert [r["step"] for r in read_rows(tmp_path / "b" / METRICS_FILE)] == [1, 2]


# --- null logger and factory -------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [None, {"type": "none"}, OmegaConf.load(CONF / "none.yaml")])
def test_null_logger_writes_nothing(tmp_path: Path, cfg) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = build_logger(cfg, run_dir, run_name="r")
    assert isinstance(logger, NullLogger)
    logger.log_hyperparams({"a": {"b": 1}})
    logger.log_metadata({"git_commit": "abc"})
    log_two_epochs(logger)
    assert logger.state_dict() == {}
    logger.finalize()
    assert list(run_dir.iterdir()) == []


def test_factory_builds_local_from_conf_file(tmp_path: Path) -> None:
    logger = build_logger(OmegaConf.load(CONF / "local.yaml"), tmp_path, run_name="r")
    assert isinstance(logger, LocalLogger) and logger.plots
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.finalize()
    assert read_rows(tmp_path / METRICS_FILE)[0]["train/loss"] == 1.0


def test_factory_unknown_type_names_the_options(tmp_path: Path) -> None:
    with pytest.raises(LoggerConfigError) as err:
        build_logger({"type": "wandb"}, tmp_path, run_name="r")
    assert "logger.type: Invalid value 'wandb'" in str(err.value)
    assert "none, local, comet" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"type": "local", "plot": True}, "logger.plot: unknown key; did you mean plots?"),
        ({"type": "local", "offline": True}, "logger.offline: a comet setting, but logger.type"),
        ({"type": "local", "log_every_n_steps": 0}, "log_every_n_steps must be >= 1"),
        ({"type": "local", "log_every_n_steps": True}, "log_every_n_steps: Value 'True'"),
        ({"type": "comet", "offline": "maybe"}, "logger.offline: Value 'maybe' is not a valid"),
        ({"type": "comet", "workspace": [3]}, "logger.workspace: Cannot convert"),
    ],
)
def test_factory_rejects_bad_keys(tmp_path: Path, cfg: dict, message: str) -> None:
    with pytest.raises(LoggerConfigError, match=message):
        build_logger(cfg, tmp_path, run_name="r")


def test_comet_conf_reads_project_and_workspace_from_env(monkeypatch) -> None:
    cfg = OmegaConf.load(CONF / "comet.yaml")
    monkeypatch.delenv("COMET_PROJECT_NAME", raising=False)
    monkeypatch.delenv("COMET_WORKSPACE", raising=False)
    assert cfg.project_name == "salt" and cfg.workspace is None
    monkeypatch.setenv("COMET_PROJECT_NAME", "gn2")
    monkeypatch.setenv("COMET_WORKSPACE", "ftag")
    assert cfg.project_name == "gn2" and cfg.workspace == "ftag"
    # No config key may carry the API key, not even through an interpolation.
    for path in CONF.glob("*.yaml"):
        assert "api_key" not in path.read_text().lower().replace("comet_api_key", "")
        assert "oc.env:COMET_API_KEY" not in path.read_text()


# --- comet (offline: no network) ---------------------------------------------------------------


def test_flatten_uses_dots() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": None,
    }


def test_comet_offline_archive_holds_the_run_and_never_the_key(
    tmp_path: Path, monkeypatch, caplog, capfd
) -> None:
    monkeypatch.setenv("COMET_API_KEY", FAKE_KEY)
    run_dir = tmp_path / "run"
    cfg = OmegaConf.load(CONF / "comet.yaml")
    cfg.offline = True
    with caplog.at_level(logging.DEBUG):
        logger = build_logger(cfg, run_dir, run_name="GN2_20240101-T000000")
        assert isinstance(logger, MultiLogger)
        params = {"model": {"lr": 1e-3, "tasks": ["jets", "track_origin"]}, "seed": 42}
        logger.log_hyperparams(params)
        logger.log_metadata({"git_commit": "0123abcd", "num_params": 12345})
        log_two_epochs(logger)
        key = logger.state_dict()["experiment_key"]
        logger.finalize()

    archive, experiment, messages = read_archive(run_dir)
    assert archive.name == f"{key}.zip"
    assert experiment["offline_id"] == key and experiment["project_name"] == "salt"
    metrics = {
        (m["metric"]["metricName"], m["metric"]["step"]): m["metric"]
        for m in by_type(messages, "metric_msg")
    }
    assert metrics[("train/loss", 10)]["metricValue"] == pytest.approx(0.1)
    assert metrics[("train/jets_loss", 60)]["metricValue"] == pytest.approx(0.5 / 60)
    assert metrics[("train/lr", 30)]["metricValue"] == pytest.approx(0.03)
    assert metrics[("val/jet_accuracy", 60)]["metricValue"] == pytest.approx(0.7)
    assert metrics[("val/jet_accuracy", 60)]["epoch"] == 1
    assert metrics[("val/track_origin_loss", 30)]["metricValue"] == pytest.approx(0.4)
    # comet stores a list value under "params", a scalar under "param".
    params_logged = [p.get("param") or p["params"] for p in by_type(messages, "parameter_msg")]
    manual = {p["paramName"]: p["paramValue"] for p in params_logged if p["source"] == "manual"}
    assert manual == {"model.lr": 1e-3, "model.tasks": ["jets", "track_origin"], "seed": 42}
    others = {o["key"]: o["value"] for o in by_type(messages, "log_other")}
    assert others["git_commit"] == "0123abcd" and others["num_params"] == 12345
    assert others["Name"] == "GN2_20240101-T000000" and others["status"] == "success"
    # No auto-logged environment, packages, command line, source code or stdout.
    kinds = {m["type"] for m in messages}
    assert kinds <= {"metric_msg", "parameter_msg", "log_other"}, kinds
    # The local files are written too.
    assert (run_dir / METRICS_FILE).exists() and (run_dir / "plots" / "loss.png").exists()

    # Secret search: every file the run wrote, the archive unpacked, and everything printed.
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(run_dir / "unpacked")
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) >= 6
    for path in files:
        assert FAKE_KEY.encode() not in path.read_bytes(), path
    out, err = capfd.readouterr()
    assert FAKE_KEY not in out + err + caplog.text


def test_comet_offline_opens_no_network_connection(tmp_path: Path) -> None:
    # A fresh interpreter (comet_ml reads its settings at import) with an audit hook that
    # records every connection or name lookup, from any thread.
    script = (
        "import sys\n"
        "attempts = []\n"
        "def hook(event, args):\n"
        "    if event in ('socket.connect', 'socket.getaddrinfo'):\n"
        "        attempts.append((event, repr(args)[:80]))\n"
        "sys.addaudithook(hook)\n"
        "from pathlib import Path\n"
        "from salt.tracking import build_logger\n"
        "cfg = {'type': 'comet', 'offline': True, 'plots': False}\n"
        "logger = build_logger(cfg, Path(sys.argv[1]), run_name='r')\n"
        "logger.log_hyperparams({'a': 1})\n"
        "logger.log_metrics({'train/loss': 0.5}, step=1)\n"
        "logger.finalize()\n"
        "import sentry_sdk\n"
        "assert sentry_sdk.Hub.current.client is None, 'sentry error reporting is on'\n"
        "print('ATTEMPTS', attempts)\n"
    )
    env = {
        "PYTHONPATH": str(REPO / "src"),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "COMET_API_KEY": FAKE_KEY,
    }
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script, str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ATTEMPTS []" in proc.stdout, proc.stdout
    assert FAKE_KEY not in proc.stdout + proc.stderr
    assert len(list((tmp_path / "run" / "comet").glob("*.zip"))) == 1


def test_comet_without_key_goes_offline_with_a_notice(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="salt.tracking.comet"):
        logger = CometLogger(tmp_path, run_name="r", offline=False)
    assert not logger.online
    notices = [r.getMessage() for r in caplog.records if r.name == "salt.tracking.comet"]
    assert len(notices) == 1 and "COMET_API_KEY is not set" in notices[0]
    assert "\n" not in notices[0] and "comet upload" in notices[0]
    logger.log_metrics({"train/loss": 0.5}, step=7)
    logger.finalize()
    _, _, messages = read_archive(tmp_path)
    assert ("train/loss", 7, 0.5) in {
        (m["metric"]["metricName"], m["metric"]["step"], m["metric"]["metricValue"])
        for m in by_type(messages, "metric_msg")
    }


def test_comet_resume_continues_the_same_experiment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    first = CometLogger(tmp_path / "run1", run_name="r", offline=True)
    state = first.state_dict()
    assert set(state) == {"experiment_key"}
    first.finalize()

    second = CometLogger(tmp_path / "run2", run_name="r", offline=True, resume_state=state)
    assert second.state_dict() == state
    second.log_metrics({"train/loss": 0.1}, step=100)
    second.finalize()
    _, experiment, messages = read_archive(tmp_path / "run2")
    assert experiment["offline_id"] == state["experiment_key"]
    assert experiment["resume_strategy"] == "get_or_create"
    assert by_type(messages, "metric_msg")[0]["metric"]["step"] == 100


def test_comet_rejects_a_bad_experiment_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"resume_state\['experiment_key'\] = 'abc'"):
        CometLogger(tmp_path, run_name="r", offline=True, resume_state={"experiment_key": "abc"})
