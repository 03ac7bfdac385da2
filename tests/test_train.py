"""End-to-end training on the built-in sample: run directory, resume, seeds, DDP, AMP, NaN stop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from salt.data.build import resolve_files
from salt.errors import ConfigError, DataError, TrainingError
from salt.train import train
from salt.training import checkpoint as ckpt
from salt.training.config import cpu_autocast_warning
from salt.training.distributed import DistInfo, barrier, cleanup, init_distributed, spawn
from salt.training.loop import fit, forward, setup, validate
from salt.training.optim import Schedule, adamw
from salt.training.setup import build_loaders
from tests.conftest import (
    TRAINED_RUN_STEPS,
    TrainedRun,
    entry_point_error,
    logged_step,
    small_tmpfs,
    snapshot,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
TASKS = ("jet_classification", "track_origin", "track_vertexing")
# GN2 shrunk to train in a second (shared by the end-to-end test files)
TINY_MODEL = [
    "model.embed_dim=16",
    "model.init_net.hidden_layers=[16]",
    "model.encoder.num_layers=1",
    "model.encoder.out_dim=16",
    "model.attention.num_heads=2",
    *[f"model.tasks.{t}.hidden_layers=[8]" for t in TASKS],
]
TINY = [
    "force=true",
    "logger=none",
    "trainer.progress_bar=false",
    "data.sample.num_jets=1200",
    "data.batch_size=100",
    "data.chunk_batches=3",
    "data.num_workers=0",
    "trainer.max_epochs=2",
    *TINY_MODEL,
]
NO_DROPOUT = ["model.encoder.dropout=0", *[f"model.tasks.{t}.dropout=0" for t in TASKS]]


def make_cfg(tmp_path: Path, cache: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(
            "train",
            overrides=[
                *TINY,
                f"log_dir={tmp_path / 'logs'}",
                f"data.sample.dir={cache}",
                *overrides,
            ],
        )


# the shared two-epoch run: named tiny, a metrics row every step
TWO_EPOCHS = ["logger=local", "logger.log_every_n_steps=1", "model.name=tiny"]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory, sample_cache: Path) -> Iterator[Path]:
    """A finished one-epoch run (12 steps) for the tests that resume it, retrain it from its
    config or load its checkpoint. Read only: their new runs go to their own log_dir."""
    tmp = tmp_path_factory.mktemp("one_epoch")
    train(make_cfg(tmp, sample_cache, "trainer.max_epochs=1"))
    (run,) = run_dirs(tmp)
    before = snapshot(tmp)
    yield run
    assert snapshot(tmp) == before, "a test changed the shared one-epoch run"


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory, sample_cache: Path) -> Iterator[Path]:
    """A finished run (2 epochs of 12 steps) named tiny, with a metrics row every step: its
    directory's contents and its loss curve are tested. Read only."""
    tmp = tmp_path_factory.mktemp("two_epochs")
    train(make_cfg(tmp, sample_cache, *TWO_EPOCHS))
    (run,) = run_dirs(tmp)
    before = snapshot(tmp)
    yield run
    assert snapshot(tmp) == before, "a test changed the shared two-epoch run"


def cpu() -> DistInfo:
    return DistInfo(0, 0, 1, torch.device("cpu"), True, "gloo")


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "logs").iterdir() if p.is_dir())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(path)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


# `python -m salt.train`, and what the installed `salt-train` runs: main imported by name (a
# task function outside __main__, whose config path Hydra resolves differently)
COMMANDS = {
    "module": ["-m", "salt.train"],
    "installed": ["-c", "import sys; from salt.train import main; sys.exit(main())"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_fast_dev_run_cli(tmp_path: Path, sample_cache: Path, command: str) -> None:
    cmd = [
        sys.executable,
        *COMMANDS[command],
        *TINY,
        "trainer.fast_dev_run=2",
        f"data.sample.dir={sample_cache}",
        "force=false",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "val loss" in out.stdout
    assert not (tmp_path / "logs").exists()  # no run directory, no checkpoints
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written at all


def test_help_lists_groups(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "salt.train", "--help"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for text in (
        "model: GN1, GN2, GN2Cat",
        "attention: gatv2, scaled_dot_product",
        "pooling: cross_attention, global_attention",
        "logger: comet, local, none, tensorboard",
    ):
        assert text in out.stdout


def test_run_directory_contents(two_epochs: Path) -> None:
    run = two_epochs
    assert run.name.startswith("tiny_")
    files = {p.name for p in run.iterdir()}
    assert {
        "config.yaml",
        "metadata.yaml",
        "norm_dict.yaml",
        "class_dict.yaml",
        "metrics.jsonl",
        "ckpts",
        "plots",
    } <= files
    names = sorted(p.name for p in (run / "ckpts").iterdir())
    assert names[-1] == "last.ckpt" and len(names) == 3
    assert names[0].startswith("epoch=000-val_loss=") and names[1].startswith("epoch=001-")
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    meta = yaml.safe_load((run / "metadata.yaml").read_text())
    assert meta["seed"] == 42 and meta["num_params"] > 0
    assert meta["data"]["train"]["num_jets"] == 1200
    assert "commit" in meta["git"] and "dirty" in meta["git"]
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.model.name == "tiny" and saved.trainer.max_epochs == 2
    assert saved.ckpt_path is None
    last = ckpt.load_checkpoint(run / "ckpts" / "last.ckpt")
    assert last["counters"]["epoch"] == 1 and last["counters"]["epoch_complete"]
    assert last["counters"]["step"] == 2 * 12
    # checkpoints are named (and the best one picked) by the validation jet-classification
    # loss, as in the old tool (trainer.monitor=auto), not by the total loss
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r]
    for name, row in zip(names[:2], val, strict=True):
        assert name.endswith(f"val_loss={row['val/jet_classification_loss']:.5f}.ckpt")
        assert row["val/loss"] != row["val/jet_classification_loss"]
    best = min(r["val/jet_classification_loss"] for r in val)
    assert last["counters"]["best_val_loss"] == pytest.approx(best)


def test_monitor_must_name_a_validation_metric(tmp_path: Path, sample_cache: Path) -> None:
    cfg = make_cfg(tmp_path, sample_cache, "trainer.monitor=val/jet_acuracy")
    with pytest.raises(
        ConfigError,
        match=r"trainer.monitor='val/jet_acuracy': expected auto or "
        r"one of \['val/loss', 'val/jet_classification_loss', .*'val/jet_accuracy', "
        r"'val/light_rej_70', 'val/c_rej_70', 'val/tau_rej_70'\]; did you mean val/jet_accuracy\?",
    ):
        train(cfg)
    assert not (tmp_path / "logs").exists()  # refused before the run directory is made


def from_run_config(run_dir: Path, *overrides: str) -> list[str]:
    """The command line that trains with a run directory's saved config.yaml."""
    return [
        sys.executable,
        "-m",
        "salt.train",
        "--config-dir",
        str(run_dir),
        "--config-name",
        "config",
        *overrides,
    ]


def test_config_yaml_trains_the_run_again(tmp_path: Path, one_epoch: Path) -> None:
    first = one_epoch
    # the new run in this test's log_dir, not beside the shared run
    cmd = from_run_config(first, f"log_dir={tmp_path / 'logs'}")
    out = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (second,) = run_dirs(tmp_path)
    assert_bitwise_equal(weights(first / "ckpts/last.ckpt"), weights(second / "ckpts/last.ckpt"))


def test_resume_at_epoch_boundary_is_bitwise_identical(tmp_path: Path, sample_cache: Path) -> None:
    straight = fit(make_cfg(tmp_path, sample_cache), cpu()).run_dir
    (epoch0,) = (straight / "ckpts").glob("epoch=000-*.ckpt")
    # a checkpoint write that was killed: the truncated temp file must be ignored by resume
    last = (straight / "ckpts" / "last.ckpt").read_bytes()
    (straight / "ckpts" / ".last.ckpt.tmp-999-dead").write_bytes(last[: len(last) // 2])
    # resume from the end of epoch 0 with the short form and with the saved config + ckpt_path
    train(make_cfg(tmp_path, sample_cache, f"resume={straight}"), overrides=[])
    cmd = from_run_config(straight, f"ckpt_path='{epoch0}'")  # quoted: the name holds '='
    out = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    from_last, from_epoch0 = (p for p in run_dirs(tmp_path) if p != straight)
    # resume=<dir> took last.ckpt, the end of training: nothing left to do, nothing written
    assert not list((from_last / "ckpts").iterdir())
    ckpts = sorted(p.name for p in (from_epoch0 / "ckpts").iterdir())
    assert ckpts[0].startswith("epoch=001-")  # the epoch count continues
    final = weights(straight / "ckpts/last.ckpt")
    assert_bitwise_equal(final, weights(from_epoch0 / "ckpts/last.ckpt"))


def test_a_requeued_job_reads_the_dicts_its_first_attempt_copied(
    tmp_path: Path, sample_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slurm requeues a job (the same SLURM_JOB_ID, SLURM_RESTART_COUNT >= 1) with its original
    command line: it continues its run directory with the norm dict copied there, not the
    original, which was edited in between."""
    mine = tmp_path / "my_norms.yaml"
    shutil.copyfile(resolve_files(make_cfg(tmp_path, sample_cache).data).norm_dict, mine)
    cfg = make_cfg(tmp_path, sample_cache, "trainer.max_epochs=1", f"data.norm_dict={mine}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    first = fit(cfg, cpu()).run_dir
    assert first is not None
    copy = first / "norm_dict.yaml"
    assert copy.read_text() == mine.read_text()
    norms = yaml.safe_load(mine.read_text())
    norms["jets"]["pt_btagJes"]["mean"] += 1000.0  # the original changes after the first attempt
    mine.write_text(yaml.safe_dump(norms))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run = setup(cfg, cpu())
    assert run.run_dir == first
    assert run.cfg.data.norm_dict == str(copy)
    assert copy.read_text() != mine.read_text()  # the copy was not refreshed from the original


def test_resume_with_more_epochs_extends_the_run(
    tmp_path: Path, sample_cache: Path, one_epoch: Path
) -> None:
    first = one_epoch
    train(
        make_cfg(tmp_path, sample_cache, f"resume={first}"),
        # the new run beside this test's, not the shared run's
        overrides=[f"resume={first}", "trainer.max_epochs=2", f"log_dir={tmp_path / 'logs'}"],
    )
    (second,) = run_dirs(tmp_path)
    names = sorted(p.name for p in (second / "ckpts").iterdir())
    assert names[0].startswith("epoch=001-") and names[-1] == "last.ckpt"
    state = ckpt.load_checkpoint(second / "ckpts/last.ckpt")
    assert state["counters"]["step"] == 24 and state["scheduler"]["total_steps"] == 24
    with pytest.raises(ValueError, match="continues that run with its own model config"):
        train(make_cfg(tmp_path, sample_cache, f"resume={first}"), overrides=["model=GN1"])


def test_resume_overrides_follow_hydras_grammar(
    tmp_path: Path, sample_cache: Path, one_epoch: Path
) -> None:
    """`resume=<run> key=value` parses values as Hydra does (1e-3 a float, null None, lists),
    typed by the schema; `~key` deletes the key (it takes the schema's default), `+`/`++` add;
    unknown keys, sweeps and groups are refused."""
    from salt.train import resume_config

    first = one_epoch
    cfg = make_cfg(tmp_path, sample_cache, f"resume={first}")
    resumed = resume_config(
        cfg,
        [
            f"resume={first}",
            "optimizer.max=1e-3",
            "trainer.gradient_clip_val=null",
            "~data.batch_size",
            "data.allow_truth_inputs=[d0,z0]",
            "++seed=7",
        ],
    )
    assert resumed.optimizer.max == 1e-3 and isinstance(resumed.optimizer.max, float)
    assert resumed.trainer.gradient_clip_val is None
    assert resumed.data.batch_size == 1000  # deleted: the default, not the run's 100
    assert list(resumed.data.allow_truth_inputs) == ["d0", "z0"] and resumed.seed == 7
    assert resumed.ckpt_path.endswith(".ckpt") and resumed.resume is None
    with pytest.raises(ValueError, match=r"has no key 'trainer\.nothing' to delete"):
        resume_config(cfg, ["~trainer.nothing"])
    with pytest.raises(ValueError, match="one value per key, not a sweep"):
        resume_config(cfg, ["trainer.max_epochs=2,3"])
    with pytest.raises(ValueError, match=r"'\+trainer\.extra=1': trainer\.extra: unknown key"):
        resume_config(cfg, ["+trainer.extra=1"])
    with pytest.raises(ValueError, match=r"'optimizer\.max=fast': optimizer\.max: Value 'fast'"):
        resume_config(cfg, ["optimizer.max=fast"])


STOP_AT = 35  # a step in the middle of the trained run's second epoch (30 steps per epoch)


def test_resume_mid_epoch_after_sigterm_is_bitwise_identical(
    tmp_path: Path, trained_run: TrainedRun
) -> None:
    """The session's trained run again, in a real process stopped by a real signal in the middle
    of its second epoch, then resumed: the weights of the uninterrupted run."""
    logs = tmp_path / "logs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "salt.train", *trained_run.overrides, f"log_dir={logs}"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(logged_step(run) >= STOP_AT for run in logs.glob("*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not reach the stop point in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" in err
    (first,) = run_dirs(tmp_path)
    state = ckpt.load_checkpoint(first / "ckpts" / "last.ckpt")
    step, epoch = state["counters"]["step"], state["counters"]["epoch"]
    # saved at the step it stopped at (the last one logged), not at a periodic checkpoint
    assert step == logged_step(first) and STOP_AT <= step < TRAINED_RUN_STEPS
    per_epoch = TRAINED_RUN_STEPS // 2
    assert epoch == 1 and not state["counters"]["epoch_complete"]  # stopped mid-epoch
    assert state["data"] == {"epoch": epoch, "consumed": step - per_epoch * epoch}
    train(trained_run.compose(logs, f"resume={first}"))
    resumed = next(p for p in run_dirs(tmp_path) if p != first)
    assert_bitwise_equal(
        weights(trained_run.run_dir / "ckpts/last.ckpt"), weights(resumed / "ckpts/last.ckpt")
    )


def test_same_seed_same_loss_curve(tmp_path: Path, sample_cache: Path, two_epochs: Path) -> None:
    """The shared two-epoch run (seed 42) trained again with seed 42, then with seed 7."""
    runs = [two_epochs]
    for name, seed in (("b", "seed=42"), ("c", "seed=7")):
        runs.append(fit(make_cfg(tmp_path / name, sample_cache, *TWO_EPOCHS, seed), cpu()).run_dir)
    curves = []
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        curves.append([r["train/loss"] for r in rows if "train/loss" in r])
    assert len(curves[0]) == 24
    assert curves[0] == curves[1]
    assert curves[0] != curves[2]


def test_bf16_autocast_on_cpu(tmp_path: Path, sample_cache: Path) -> None:
    cfg = make_cfg(tmp_path, sample_cache, "trainer.precision=bf16", "trainer.fast_dev_run=2")
    run = setup(cfg, cpu())
    batch = next(iter(run.train_loader))
    outputs, losses = forward(run, batch)
    assert outputs["jet_classification"].dtype == torch.bfloat16
    assert torch.isfinite(losses["loss"])
    assert not run.scaler.is_enabled()  # a GradScaler only for fp16
    fit(cfg, cpu())


def test_autocast_on_a_cpu_without_native_support_is_warned_of(
    tmp_path: Path, sample_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert cpu_autocast_warning(None, {"bfloat16": False}) == ""
    assert cpu_autocast_warning(torch.bfloat16, {"bfloat16": True}) == ""
    slow = cpu_autocast_warning(torch.bfloat16, {"bfloat16": False})
    assert "trainer.precision=bf16" in slow and "trainer.precision=32" in slow
    assert "trainer.precision=16 " in cpu_autocast_warning(torch.float16, {"float16": False})
    # a run warns exactly when this CPU lacks the support
    cfg = make_cfg(tmp_path, sample_cache, "trainer.precision=bf16", "trainer.fast_dev_run=1")
    with caplog.at_level("WARNING", logger="salt"):
        setup(cfg, cpu())
    warned = [r.getMessage() for r in caplog.records if "without native" in r.getMessage()]
    assert warned == (
        [cpu_autocast_warning(torch.bfloat16)] if cpu_autocast_warning(torch.bfloat16) else []
    )


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path: Path, sample_cache: Path, one_epoch: Path
) -> None:
    first = one_epoch
    good = ckpt.load_checkpoint(first / "ckpts" / "last.ckpt")
    # a training state that has blown up
    bad = dict(good)
    bad["model"] = {
        k: (torch.full_like(v, float("nan")) if "init" in k else v)
        for k, v in good["model"].items()
    }
    ckpt.save_checkpoint(bad, tmp_path / "bad.ckpt")
    cfg = make_cfg(
        tmp_path, sample_cache, f"ckpt_path={tmp_path / 'bad.ckpt'}", "trainer.ckpt_every_n_steps=1"
    )
    with pytest.raises(TrainingError, match=r"non-finite loss at step 12 \(epoch 1\) in task"):
        fit(cfg, cpu())
    (second,) = run_dirs(tmp_path)
    assert not list((second / "ckpts").iterdir())  # nothing written after the bad state
    assert (first / "ckpts" / "last.ckpt").exists()


def test_checkpoint_from_other_model_config_is_refused(
    tmp_path: Path, sample_cache: Path, one_epoch: Path
) -> None:
    first = one_epoch
    cfg = make_cfg(
        tmp_path,
        sample_cache,
        f"ckpt_path={first / 'ckpts/last.ckpt'}",
        "model.encoder.num_layers=2",
    )
    with pytest.raises(
        ckpt.CheckpointError, match=r"model.encoder.num_layers: checkpoint 1, config 2"
    ):
        fit(cfg, cpu())
    # refused before a run directory was made
    assert not (tmp_path / "logs").exists() or run_dirs(tmp_path) == []

    # a checkpoint whose model config was stored as written (keys with defaults left out, as
    # before the typed configs) fits the same model: compared as the schema reads both
    state = ckpt.load_checkpoint(first / "ckpts/last.ckpt")
    sparse = state["config"]
    del sparse["encoder"]["norm_affine"], sparse["pooling"]["num_layers"]
    ckpt.save_checkpoint(state, tmp_path / "sparse.ckpt")
    cfg = make_cfg(tmp_path, sample_cache, f"ckpt_path={tmp_path / 'sparse.ckpt'}")
    assert fit(cfg, cpu()).counters.step > state["counters"]["step"]  # it went on


def _ddp_rank(rank: int, cfg_dict: dict, out: str) -> None:
    cfg = OmegaConf.create(cfg_dict)
    run = fit(cfg, init_distributed("cpu", "cpu"))
    torch.save(run.tagger.state_dict(), Path(out) / f"rank{rank}.pt")


def test_ddp_two_ranks_match_single_process(tmp_path: Path, sample_cache: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        sample_cache,
        "trainer.max_epochs=1",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        *NO_DROPOUT,
    )
    spawn(_ddp_rank, 2, (OmegaConf.to_container(cfg), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert_bitwise_equal(r0, r1)
    (run,) = run_dirs(tmp_path)  # rank 0 only writes
    assert_bitwise_equal(r0, weights(run / "ckpts" / "last.ckpt"))

    # one process over the same global batches: the mean of the two ranks' losses per step
    single = make_cfg(tmp_path / "single", sample_cache, "trainer.max_epochs=1", *NO_DROPOUT)
    ref = setup(single, cpu())
    files = resolve_files(OmegaConf.to_container(single.data, resolve=True))
    shards = [
        build_loaders(ref.cfg, files, DistInfo(r, r, 2, torch.device("cpu"), r == 0, "gloo"))[0]
        for r in (0, 1)
    ]
    steps = len(shards[0])
    assert steps == 6
    ref.optimizer = adamw(ref.tagger.parameters(), ref.cfg.optimizer)
    ref.scheduler = Schedule(ref.optimizer, ref.cfg.optimizer, steps)
    for b0, b1 in zip(*shards, strict=True):
        ref.optimizer.zero_grad()
        loss = (
            ref.model(b0["inputs"], b0["pad_masks"], b0["labels"])[1]["loss"]
            + ref.model(b1["inputs"], b1["pad_masks"], b1["labels"])[1]["loss"]
        ) / 2
        loss.backward()
        if single.trainer.gradient_clip_val:
            clip = float(single.trainer.gradient_clip_val)
            torch.nn.utils.clip_grad_norm_(ref.tagger.parameters(), clip)
        ref.optimizer.step()
        ref.scheduler.step()
    for k, v in ref.tagger.state_dict().items():
        torch.testing.assert_close(v, r0[k], rtol=1e-4, atol=1e-5, msg=k)


def _staging_rank(rank: int, cfg_dict: dict, out: str) -> None:
    cfg = OmegaConf.create(cfg_dict)
    root = Path(cfg.data.move_files_temp)
    dist = init_distributed("cpu", "cpu")
    try:
        with contextlib.ExitStack() as resources:
            run = setup(cfg, dist, resources)
            seen = {
                "train": [str(p) for p in run.train_loader.dataset.files],
                "copies": sorted(p.name for p in root.glob("salt-stage-*")),
            }
            barrier()  # both ranks have looked before either leaves
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        cleanup()


def test_ddp_ranks_of_a_node_share_one_staged_copy(tmp_path: Path, sample_cache: Path) -> None:
    """Only the node's first rank copies; the other reads the same copy; it is removed once
    both are done (today's 4-GPU node held four copies)."""
    root = tmp_path / "stage"
    cfg = make_cfg(
        tmp_path,
        sample_cache,
        f"data.move_files_temp={root}",
        "trainer.fast_dev_run=1",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
    )
    spawn(_staging_rank, 2, (OmegaConf.to_container(cfg), str(tmp_path)))
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]["copies"]) == 1 and seen[0]["copies"] == seen[1]["copies"]
    assert seen[0]["train"] == seen[1]["train"]
    assert seen[0]["train"][0].startswith(str(root / seen[0]["copies"][0]))
    assert not list(root.glob("salt-stage-*"))  # removed after both ranks were done


def ddp_command(tmp_path: Path, cache: Path, *overrides: str) -> list[str]:
    """`python -m salt.train` with two gloo ranks on the CPU (`spawn`), the tiny model."""
    return [
        sys.executable,
        "-m",
        "salt.train",
        *TINY,
        f"data.sample.dir={cache}",
        f"log_dir={tmp_path / 'logs'}",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        *overrides,
    ]


def val_row(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if "val/loss" in r]
    return {k: v for k, v in row.items() if k.startswith("val/")}


@pytest.mark.slow
def test_ddp_with_fewer_validation_batches_than_ranks(tmp_path: Path, sample_cache: Path) -> None:
    """One validation batch for two ranks: rank 1 validates no jet. The run ends with its
    checkpoints and the validation figures of one process on the same jets (it hung in
    validation: rank 0's forward pass broadcast the model's buffers, rank 1 summed nothing)."""
    one_batch = ["data.num_val=100", "trainer.max_steps=2", "logger=tensorboard"]
    cmd = ddp_command(tmp_path, sample_cache, *one_batch, "trainer.ddp_timeout_s=60")
    out = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (run_dir,) = run_dirs(tmp_path)
    names = sorted(p.name for p in (run_dir / "ckpts").iterdir())
    assert names[0].startswith("epoch=000-val_loss=") and names[1] == ckpt.LAST
    ddp = val_row(run_dir)
    assert {"val/loss", "val/jet_accuracy", "val/light_rej_70"} <= ddp.keys()
    ddp_confusion = json.loads((run_dir / "confusion_matrix.json").read_text())["counts"]
    # rank 0 alone logs: one event file (as one metrics file)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1

    # one process, the same jets and the DDP run's weights
    single = setup(make_cfg(tmp_path / "single", sample_cache, *one_batch), cpu())
    shares = [
        build_loaders(single.cfg, resolve_files(single.cfg.data), rank)[1].dataset
        for rank in (DistInfo(r, r, 2, torch.device("cpu"), r == 0, "gloo") for r in (0, 1))
    ]
    assert [len(s.rank_sequence(0, 0)) for s in shares] == [1, 0]  # rank 1: no batch
    single.tagger.load_state_dict(weights(run_dir / "ckpts" / ckpt.LAST))
    alone = validate(single)
    assert alone.metrics == pytest.approx(ddp, rel=1e-6)
    assert ddp_confusion == alone.confusion  # the ranks' counts summed (rank 1's are zeros)
    assert sum(map(sum, ddp_confusion)) == 100


def spawned_ranks(parent: int) -> dict[str, int]:
    """``{"salt-rank0": pid, ...}``: the ranks `spawn` started for ``parent`` (by their
    process names)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            name = (proc / "comm").read_text().strip()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == parent and name.startswith("salt-rank"):
            found[name] = int(proc.name)
    return found


@pytest.mark.slow
def test_a_stuck_ddp_rank_stops_the_run_naming_it(tmp_path: Path, sample_cache: Path) -> None:
    """Rank 1 stops (SIGSTOP: alive, never reaches the next gradient all-reduce) after a few
    steps; rank 0 waits trainer.ddp_timeout_s, then the run ends with one line naming rank 1
    (it waited forever)."""
    logs = tmp_path / "logs"
    every_step = ["logger=local", "logger.log_every_n_steps=1"]
    cmd = ddp_command(tmp_path, sample_cache, *every_step, "trainer.ddp_timeout_s=2")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stderr=subprocess.PIPE, text=True)
    ranks: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 180
        while not any(logged_step(d) >= 2 for d in logs.glob("*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.01)
        ranks = spawned_ranks(proc.pid)
        os.kill(ranks["salt-rank1"], signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        proc.kill()
        for pid in ranks.values():  # a rank left stopped would never end
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("salt:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        r"salt: error on rank 0: rank 1 did not arrive in the gradient all-reduce of step \d+ "
        r"within trainer\.ddp_timeout_s=2: it is stuck or dead \(see the output of rank 1\); "
        r"the run stops here, its checkpoints are kept",
        lines[0],
    ), lines[0]
    assert waited < 60  # the timeout, the others' notes, the stopped rank's end
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values())


def test_move_files_temp_auto_takes_the_slurm_jobs_tmpdir(monkeypatch, tmp_path: Path) -> None:
    from salt.data.staging import staging_root

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert staging_root("auto") is None  # not a Slurm job: read in place
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert staging_root("auto") == str(tmp_path)
    assert staging_root(None) is None and staging_root("/dev/shm/x") == "/dev/shm/x"


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout


def test_dirty_checkout_refused_then_tag_pushed(tmp_path: Path, sample_cache: Path) -> None:
    """salt runs from a real git checkout with a bare remote: refusal, force, tag push."""
    root = Path(__file__).resolve().parents[1]
    code, remote = tmp_path / "code", tmp_path / "remote.git"
    _git(tmp_path, "init", "-q", "--bare", str(remote))
    _git(tmp_path, "init", "-q", "-b", "main", str(code))
    shutil.copytree(
        root / "src" / "salt", code / "src" / "salt", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(root / "conf", code / "conf")
    for args in (
        ("config", "user.email", "t@example.com"),
        ("config", "user.name", "t"),
        ("add", "-A"),
        ("commit", "-qm", "code"),
        ("remote", "add", "origin", str(remote)),
    ):
        _git(code, *args)
    env_code = {**os.environ, "PYTHONPATH": str(code / "src")}
    base = [
        sys.executable,
        "-m",
        "salt.train",
        *[o for o in TINY if o != "force=true"],
        f"data.sample.dir={sample_cache}",
        f"log_dir={tmp_path / 'logs'}",
        "trainer.max_epochs=1",
    ]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*base, *extra], cwd=tmp_path, env=env_code, capture_output=True, text=True, timeout=300
        )

    (code / "src" / "salt" / "train.py").write_text(
        (code / "src" / "salt" / "train.py").read_text() + "\n# local edit\n"
    )
    refused = run()
    assert refused.returncode == 1
    assert "src/salt/train.py" in refused.stderr and "force=true" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "logs").exists()

    forced = run("force=true", "tag=true")
    assert forced.returncode == 0, forced.stderr
    assert _git(remote, "tag") == ""  # force disables tagging

    _git(code, "commit", "-qam", "edit")
    tagged = run("tag=true")
    assert tagged.returncode == 0, tagged.stderr
    newest = max((p for p in (tmp_path / "logs").iterdir()), key=lambda p: p.stat().st_mtime)
    assert _git(remote, "tag").split() == [newest.name]
    meta = yaml.safe_load((newest / "metadata.yaml").read_text())
    assert meta["git"]["commit"] == _git(code, "rev-parse", "HEAD").strip()
    assert meta["git"]["dirty"] is False


def test_bad_input_gives_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process: the error, and its one line through the entry point's `run_entry_point`
    (the command line's format: test_bad_inputs.test_cli_error_is_one_line_without_traceback)."""
    missing = tmp_path / "missing.h5"
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                *[o for o in TINY if not o.startswith("data.sample")],
                "data=ftag",
                f"data.train_file={missing}",
                f"data.val_file={missing}",
                f"log_dir={tmp_path / 'logs'}",
            ],
        )
    message = f"{missing}: file not found (data.train_file)."
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        train(cfg)
    assert f"salt: error: {message}" in entry_point_error(train, cfg, capsys)


@pytest.mark.parametrize("where", ["a file", "below a file", "read-only", "no GPU"])
def test_unusable_log_dir_or_device_is_one_line_before_anything_is_written(
    where: str, tmp_path: Path, sample_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    with contextlib.ExitStack() as stack:
        if where == "read-only":
            mount = stack.enter_context(small_tmpfs(tmp_path / "ro", "64k"))
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        setting = {
            "a file": f"log_dir={afile}",
            "below a file": f"log_dir={afile}/logs",
            "read-only": f"log_dir={tmp_path}/ro/logs",
            "no GPU": "trainer.accelerator=gpu",
        }[where]
        expected = {
            "a file": f"{afile} is not a directory",
            "below a file": f"{afile} is not a directory",
            "read-only": f"{tmp_path}/ro is on a read-only file system",
            "no GPU": "trainer.accelerator='gpu' but CUDA is not available on this machine",
        }[where]
        if where == "no GPU" and torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        cfg = make_cfg(tmp_path, sample_cache, setting)
        before = {p for d in (tmp_path, sample_cache) for p in d.rglob("*")}
        err = entry_point_error(train, cfg, capsys)
        assert err.count("\n") == 1 and err.startswith("salt: error: ") and expected in err, err
        assert {p for d in (tmp_path, sample_cache) for p in d.rglob("*")} == before


def comet_uploads(archive: Path) -> list[tuple[str, str, bytes]]:
    """(kind, file name, content) of every file an offline comet archive uploads."""
    with zipfile.ZipFile(archive) as z:
        messages = [json.loads(line) for line in z.read("messages.json").splitlines() if line]
        return [
            (u["upload_type"], u["additional_params"]["fileName"], z.read(u["file_path"]))
            for u in (m["payload"] for m in messages if m["type"] == "file_upload")
        ]


def test_comet_offline_run_keeps_no_secret_and_resume_continues_experiment(
    tmp_path: Path, sample_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "fake-secret-key-0123456789abcdef"
    monkeypatch.setenv("COMET_API_KEY", secret)
    monkeypatch.setenv("COMET_WORKSPACE", "someone")
    comet = ["logger=comet", "logger.offline=true", "trainer.max_epochs=1"]
    first = fit(make_cfg(tmp_path, sample_cache, *comet), cpu()).run_dir
    key = ckpt.load_checkpoint(first / "ckpts/last.ckpt")["logger"]["experiment_key"]
    archives = list((first / "comet").glob("*.zip"))
    assert archives, "offline archive left in the run directory"
    # the new experiment has the run's config and dicts, unchanged, and a confusion matrix
    uploads = comet_uploads(archives[0])
    assets = {name: data for kind, name, data in uploads if kind == "asset"}
    copies = ("config.yaml", "norm_dict.yaml", "class_dict.yaml")
    assert assets == {name: (first / name).read_bytes() for name in copies}
    (matrix,) = [json.loads(data) for kind, _, data in uploads if kind == "confusion-matrix"]
    val_jets = yaml.safe_load((first / "metadata.yaml").read_text())["data"]["val"]["num_jets"]
    assert matrix["labels"] == ["b", "c", "u", "tau"]
    assert sum(map(sum, matrix["matrix"])) == val_jets
    train(
        make_cfg(tmp_path, sample_cache, f"resume={first}", *comet),
        overrides=[f"resume={first}", "trainer.max_epochs=2"],
    )
    second = next(p for p in run_dirs(tmp_path) if p != first)
    assert ckpt.load_checkpoint(second / "ckpts/last.ckpt")["logger"]["experiment_key"] == key
    # the resumed part adds its validation, not the files again
    (archive,) = (second / "comet").glob("*.zip")
    assert [kind for kind, _, _ in comet_uploads(archive)] == ["confusion-matrix"]
    for run in (first, second):
        for path in run.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert secret.encode() not in data, path
                if path.suffix == ".zip":
                    with zipfile.ZipFile(path) as z:
                        for name in z.namelist():
                            assert secret.encode() not in z.read(name), f"{path}:{name}"
