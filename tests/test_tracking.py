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


def test_comet_keeps_the_run_files_once_and_each_confusion_matrix(
    tmp_path: Path, monkeypatch
) -> None:
    """A new experiment gets config.yaml and the dict copies as assets, under their own names
    and unchanged; its resumed part does not add them again. Confusion matrices are comet's
    confusion-matrix assets, one per validation, as counts. The key is in none of them."""
    monkeypatch.setenv("COMET_API_KEY", FAKE_KEY)
    files = []
    for name, text in [
        ("config.yaml", "model:\n  name: GN2\nlogger:\n  type: comet\n"),
        ("norm_dict.yaml", "jets:\n  pt: {mean: 1.0, std: 2.0}\n"),
        ("class_dict.yaml", "jets:\n  flavour_label: [1.0, 2.0, 0.5, 4.0]\n"),
    ]:
        files.append(tmp_path / name)
        files[-1].write_text(text)
    first = CometLogger(tmp_path / "run1", run_name="r", offline=True)
    first.log_files(files)
    first.log_confusion_matrix([[8, 2], [1, 9]], ["b", "c"], step=12, epoch=0)
    first.log_confusion_matrix([[9, 1], [0, 10]], ["b", "c"], step=24, epoch=1)
    state = first.state_dict()
    first.finalize()
    archive, _, messages = read_archive(tmp_path / "run1")
    uploads = by_type(messages, "file_upload")
    with zipfile.ZipFile(archive) as zf:
        assets = {
            u["additional_params"]["fileName"]: zf.read(u["file_path"])
            for u in uploads
            if u["upload_type"] == "asset"
        }
        matrices = [
            (u["additional_params"]["step"], json.loads(zf.read(u["file_path"])))
            for u in uploads
            if u["upload_type"] == "confusion-matrix"
        ]
        for name in zf.namelist():
            assert FAKE_KEY.encode() not in zf.read(name), name
    assert assets == {p.name: p.read_bytes() for p in files}
    assert [step for step, _ in matrices] == [12, 24]
    assert matrices[1][1]["matrix"] == [[9, 1], [0, 10]] and matrices[1][1]["labels"] == ["b", "c"]

    second = CometLogger(tmp_path / "run2", run_name="r", offline=True, resume_state=state)
    second.log_files(files)  # every start calls it: a resumed experiment has them already
    second.finalize()
    _, _, messages = read_archive(tmp_path / "run2")
    assert not [u for u in by_type(messages, "file_upload") if u["upload_type"] == "asset"]


# --- jet confusion matrix and gradient norm in the local files --------------------------------


def test_local_confusion_matrix_json_and_plot(tmp_path: Path) -> None:
    from salt.tracking.metrics import CONFUSION_FILE

    logger = LocalLogger(tmp_path)
    counts = [[50, 30, 20], [10, 80, 10], [0, 0, 0]]  # no validation jet of the third class
    logger.log_confusion_matrix(counts, ["b", "c", "u"], step=12, epoch=0)
    logger.log_confusion_matrix([[60, 20, 20], [5, 90, 5], [1, 2, 7]], ["b", "c", "u"], 24, 1)
    first = json.loads((tmp_path / CONFUSION_FILE).read_text())
    assert first["step"] == 24 and first["epoch"] == 1  # the latest validation's
    logger.finalize()
    logger = LocalLogger(tmp_path / "run")
    logger.log_confusion_matrix(counts, ["b", "c", "u"], step=12, epoch=0)
    logger.finalize()
    record = json.loads((tmp_path / "run" / CONFUSION_FILE).read_text())
    assert record["class_names"] == ["b", "c", "u"] and record["counts"] == counts
    assert record["fractions"][:2] == [[0.5, 0.3, 0.2], [0.1, 0.8, 0.1]]
    assert record["fractions"][2] == [None, None, None]  # no jets: not "0% correct"
    png = (tmp_path / "run" / "plots" / "confusion_matrix.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    with pytest.raises(ValueError, match=r"expected 3x3 counts for the classes"):
        LocalLogger(tmp_path / "bad").log_confusion_matrix([[1, 2], [3, 4]], ["b", "c", "u"], 1)

    logger = LocalLogger(tmp_path / "no_plots", plots=False)
    logger.log_confusion_matrix(counts, ["b", "c", "u"], step=12, epoch=0)
    logger.finalize()
    assert (tmp_path / "no_plots" / CONFUSION_FILE).exists()
    assert not (tmp_path / "no_plots" / "plots").exists()


def test_grad_norm_plot_with_non_finite_values(tmp_path: Path) -> None:
    """A window whose every step overflowed in fp16 has no finite norm: null in the metrics
    file, a gap in the plot, and the plots of the other metrics are still drawn."""
    logger = LocalLogger(tmp_path)
    for step, norm in [(10, 2.0), (20, float("inf")), (30, float("nan")), (40, 0.5), (50, 0.0)]:
        logger.log_metrics({"train/loss": 1.0, "train/lr": 1e-4, "train/grad_norm": norm}, step)
    logger.on_epoch_end(0)
    logger.finalize()
    norms = [r["train/grad_norm"] for r in read_rows(tmp_path / METRICS_FILE)]
    assert norms == [2.0, None, None, 0.5, 0.0]
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["grad_norm.png", "loss.png", "lr.png"]
    assert (tmp_path / "plots" / "grad_norm.png").stat().st_size > 5_000


# --- TensorBoard --------------------------------------------------------------------------------


def tb_events(log_dir: Path) -> list:
    """Every event of every event file under ``log_dir``, read raw (no viewer's purging)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    return [
        event_pb2.Event.FromString(record)
        for path in sorted(log_dir.glob("events.out.tfevents.*"))
        for record in RawEventFileLoader(str(path)).Load()
    ]


def tb_points(log_dir: Path) -> list[tuple[str, int]]:
    """(tag, step) of every summary value written, in file order."""
    return [(v.tag, e.step) for e in tb_events(log_dir) for v in e.summary.value]


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logger_writes_scalars_confusion_and_config(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = build_logger(OmegaConf.load(CONF / "tensorboard.yaml"), tmp_path, run_name="r")
    assert isinstance(logger, MultiLogger)  # the local files too
    logger.log_hyperparams({"model": {"name": "GN2"}, "seed": 42})
    logger.log_metadata({"git_commit": "0123abcd"})
    log_two_epochs(logger)
    logger.log_metrics({"train/grad_norm": float("inf")}, step=61)  # an fp16 overflow window
    logger.log_confusion_matrix([[8, 2], [1, 9]], ["b", "c"], step=60, epoch=1)
    logger.finalize()
    logger.finalize()  # idempotent

    log_dir = tmp_path / "tensorboard"
    scalars = tb_scalars(log_dir)
    assert [s for s, _ in scalars["train/loss"]] == [10, 20, 30, 40, 50, 60]
    assert scalars["train/lr"][2] == (30, pytest.approx(0.03))
    assert scalars["val/jet_accuracy"] == [(30, pytest.approx(0.6)), (60, pytest.approx(0.7))]
    assert scalars["train/grad_norm"] == [(61, float("inf"))]
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    (image,) = acc.Images("val/confusion_matrix")
    assert image.step == 60 and image.encoded_image_string.startswith(PNG_MAGIC)
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: GN2" in config and "seed: 42" in config
    assert (tmp_path / METRICS_FILE).exists() and (tmp_path / "plots" / "loss.png").exists()


@pytest.mark.parametrize("where", ["new run directory", "same run directory"])
def test_tensorboard_resume_drops_the_steps_after_the_checkpoint(
    tmp_path: Path, where: str
) -> None:
    """The checkpoint is saved after step 30; steps 40 and 50 were logged, then the job was
    killed mid-write. The resumed run logs 40 and 50 again: each step is in the files once,
    with the resumed run's value, whether it continues in a new run directory (resume=) or in
    the same one (a requeued Slurm job)."""
    from salt.tracking.tensorboard import TensorBoardLogger

    first = TensorBoardLogger(tmp_path / "run1")
    first.log_hyperparams({"seed": 42})
    for step in (10, 20, 30):
        first.log_metrics({"train/loss": 1.0 / step}, step)
    first.log_confusion_matrix([[1, 0], [0, 1]], ["b", "c"], step=30, epoch=0)
    state = first.state_dict()  # what the checkpoint holds
    assert state == {
        "tensorboard_dir": str((tmp_path / "run1" / "tensorboard").resolve()),
        "tensorboard_step": 30,
    }
    for step in (40, 50):
        first.log_metrics({"train/loss": 99.0}, step)  # after the checkpoint: to be dropped
    first.finalize()
    (written,) = (tmp_path / "run1" / "tensorboard").glob("events.out.tfevents.*")
    written.write_bytes(written.read_bytes()[:-5])  # killed in the middle of a record

    run_dir = tmp_path / ("run2" if where == "new run directory" else "run1")
    second = TensorBoardLogger(run_dir, resume_state=state)
    assert second.state_dict()["tensorboard_step"] == 30
    second.log_hyperparams({"seed": 42})  # logged once, on the fresh start
    for step in (40, 50):
        second.log_metrics({"train/loss": 1.0 / step}, step)
    second.finalize()

    points = tb_points(run_dir / "tensorboard")
    assert sorted(points) == sorted(
        [("config/text_summary", 0), ("val/confusion_matrix", 30)]
        + [("train/loss", s) for s in (10, 20, 30, 40, 50)]
    )
    assert tb_scalars(run_dir / "tensorboard")["train/loss"] == [
        (s, pytest.approx(1.0 / s)) for s in (10, 20, 30, 40, 50)
    ]
    # and the marker with which a viewer that read the dropped steps forgets them
    from tensorboard.compat.proto.event_pb2 import SessionLog

    events = tb_events(run_dir / "tensorboard")
    starts = [e.step for e in events if e.session_log.status == SessionLog.START]
    assert starts == [31]
    if where == "new run directory":  # the first run's own files are left as they were
        assert ("train/loss", 40) in tb_points(tmp_path / "run1" / "tensorboard")


def test_tensorboard_resume_without_the_earlier_files_starts_with_a_warning(
    tmp_path: Path, caplog
) -> None:
    from salt.tracking.tensorboard import TensorBoardLogger

    state = {"tensorboard_dir": str(tmp_path / "gone"), "tensorboard_step": 30}
    with caplog.at_level(logging.WARNING):
        logger = TensorBoardLogger(tmp_path / "run", resume_state=state)
    assert "gone" in caplog.text and "starts at step 31" in caplog.text
    logger.log_metrics({"train/loss": 0.5}, step=40)
    logger.finalize()
    assert tb_points(tmp_path / "run" / "tensorboard") == [("train/loss", 40)]


def test_tensorboard_not_installed_is_one_config_error(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a),
    )
    with pytest.raises(LoggerConfigError) as err:
        build_logger({"type": "tensorboard"}, tmp_path, run_name="r")
    assert str(err.value) == (
        "logger.type=tensorboard needs the tensorboard package, which is not installed in this "
        "Python environment; expected it as a salt dependency: `pip install tensorboard` (or "
        "reinstall salt: `pip install -e .`)"
    )
    assert list(tmp_path.iterdir()) == []  # refused before anything is written
