"""Command-line mistakes (unknown keys, group options, config names) are one clear error with
the closest valid names, before Hydra runs; valid command lines pass unchanged."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import salt.train
from salt.config_check import check_command_line, check_overrides
from salt.errors import ConfigError
from salt.evaluation.settings import EvaluateConfig
from salt.onnx.settings import ExportConfig
from salt.schema import read_train_config
from salt.training.run_dir import config_to_save
from salt.utils import typed_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def error(config_name: str, *overrides: str, **kwargs: object) -> str:
    """The message of the check's error for these overrides."""
    with pytest.raises(ConfigError) as info:
        check_overrides(config_name, list(overrides), conf_dir=CONF, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def ok(config_name: str, *overrides: str, **kwargs: object) -> None:
    check_overrides(config_name, list(overrides), conf_dir=CONF, **kwargs)  # type: ignore[arg-type]


# ---- real commands ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "trainer.max_epoch=3",
            "salt: error: trainer.max_epoch=3: no key 'max_epoch' in 'trainer'; "
            "did you mean max_epochs?",
        ),
        (
            "model=GN2X",
            "salt: error: model=GN2X: no option 'GN2X' in config group 'model'; "
            "did you mean GN2? Options: GN1, GN2, GN2Cat, GN3.",
        ),
    ],
)
def test_train_command_gives_one_error_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    override: str,
    expected: str,
) -> None:
    """`salt.train.main` (what `python -m salt.train` and `salt-train` run) with this command
    line, in-process (the command line's own process: test_bad_inputs)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["salt-train", override])
    with pytest.raises(SystemExit) as stop:
        salt.train.main()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [expected], err
    assert "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == []  # nothing ran


# ---- keys --------------------------------------------------------------------------------------
def test_unknown_nested_key_under_group_chosen_on_command_line() -> None:
    msg = error("train", "model=GN1", "model.embed_dm=64")
    assert msg.startswith(
        "model.embed_dm=64: no key 'embed_dm' in 'model'; did you mean embed_dim?"
    )
    # a key only the chosen option has is checked against that option
    ok("train", "logger=comet", "logger.offline=true")
    msg = error("train", "logger.offline=true")  # the default logger (local) takes no such key
    assert msg == "logger.offline: a comet setting, but logger.type=local (use logger=comet)"


def test_unknown_top_level_key_and_missing_parent() -> None:
    assert error("train", "sead=1") == "sead=1: no key 'sead' in the config; did you mean seed?"
    msg = error("train", "trainr.max_epochs=3")
    assert msg.startswith(
        "trainr.max_epochs=3: no key 'trainr' in the config; did you mean trainer?"
    )
    msg = error("train", "model.encodr.num_layers=1")
    assert "no key 'encodr' in 'model'; did you mean encoder?" in msg
    msg = error("train", "zzzzzz=1")  # nothing close: the keys there are listed
    assert "its keys: name, log_dir, seed" in msg


def test_misspelled_group_names_closest_group() -> None:
    assert error("train", "modle=GN2") == (
        "modle=GN2: no config group 'modle'; did you mean model? "
        "Config groups: attention, data, launcher, logger, model, pooling."
    )
    assert "did you mean gatv2?" in error("train", "attention=gatv3")
    assert "did you mean GN2Cat?" in error("train", "model=gn2cat,GN1", multirun=True)


def test_sweeps() -> None:
    ok("train", "model=GN1,GN2", "trainer.max_epochs=1,2", "seed=range(1,3)", multirun=True)
    ok("train", "attention=scaled_dot_product,gatv2", "launcher=submitit_local", multirun=True)
    # every sweep value is checked, not only the first job's
    msg = error("train", "model=GN1,GN2X", multirun=True)
    assert msg.startswith("model=GN1,GN2X: no option 'GN2X' in config group 'model'; did you mean")
    assert "did you mean max_epochs?" in error("train", "trainer.max_epoch=1,2", multirun=True)
    ok("train", "model=glob(GN*)", multirun=True)
    assert "matches no option of config group 'model'" in error(
        "train", "model=glob(XX*)", multirun=True
    )
    # without -m (or hydra.mode=MULTIRUN), Hydra refuses a sweep: one line saying so
    assert "a sweep needs -m/--multirun" in error("train", "model=GN1,GN2")
    ok("train", "model=GN1,GN2", "hydra.mode=MULTIRUN")


def test_new_keys_hydra_settings_and_quoted_values_pass() -> None:
    ok("train", "+data.input_map.flows=flows", "++trainer.max_epochs=3", "~tag_remote")
    # a key the schema does not have is refused, added with + or not: nothing would read it
    assert error("train", "+new.key=1").startswith("new: unknown key")
    ok(
        "train",
        "launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=null",
    )
    ok("train", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1")
    ok("train", "ckpt_path='/runs/x/ckpts/epoch=001-val_loss=0.5.ckpt'", "data=ftag")
    ok("train", "model=GN2Cat", "trainer.devices=[0,1]", "debug=true")
    ok("train", "resume=logs/GN2_20260101-120000", "trainer.max_epochs=30")


def test_other_rejections_name_the_override() -> None:
    msg = error("train", "trainer.max_epochs=[1,")
    assert msg.startswith("trainer.max_epochs=[1,: cannot parse this override:")
    msg = error("train", "+trainer.max_epochs=3")
    assert msg.startswith("+trainer.max_epochs=3: Could not append to config.")
    msg = error("export", "run_dir=x", "model=GN1")  # export composes no model
    assert msg.startswith("model=GN1: Could not override 'model'.")


def test_evaluate_and_export_configs() -> None:
    ok("evaluate", "run_dir=logs/x", "data.test_file=/data/test.h5", "write_tracks=true")
    assert error("evaluate", "run_dir=x", "dat.test_file=y").startswith(
        "dat.test_file=y: no key 'dat' in the config; did you mean data?"
    )
    assert "did you mean test_file?" in error("evaluate", "run_dir=x", "data.tst_file=y")
    ok("export", "run_dir=logs/x", "parity.num_jets=10", "opset=18")
    assert "no key 'num_jet' in 'parity'; did you mean num_jets?" in error(
        "export", "parity.num_jet=10"
    )


def test_saved_run_config_with_config_dir(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=["model=GN1"])
    OmegaConf.save(OmegaConf.create(config_to_save(cfg)), tmp_path / "config.yaml")
    (tmp_path / "ckpts").mkdir()
    ckpt = f"ckpt_path='{tmp_path}/ckpts/epoch=001-val_loss=0.5.ckpt'"
    ok("config", ckpt, "trainer.max_epochs=3", extra_dir=tmp_path)
    msg = error("config", "trainer.max_epoch=3", extra_dir=tmp_path)
    assert "did you mean max_epochs?" in msg
    # a --config-dir's own group options count
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "GN4.yaml").write_text((CONF / "model" / "GN2.yaml").read_text())
    ok("train", "model=GN4", "model.embed_dim=8", extra_dir=tmp_path)
    assert "did you mean GN4?" in error("train", "model=GN5", extra_dir=tmp_path)
    # the primary config's name is checked on the search path, --config-dir included
    assert "did you mean config?" in error("confg", extra_dir=tmp_path)
    assert "did you mean train?" in error("trian")


def test_command_line_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # flags that run no job are Hydra's, whatever the overrides
    for flags in (["--help"], ["--cfg", "job"], ["-c", "all"], ["--info"], ["--hydra-help"]):
        check_command_line("train", ["trainer.max_epoch=3", *flags])
    check_command_line("train", ["-m", "model=GN1,GN2", "trainer.max_epochs=1,2"])
    with pytest.raises(SystemExit) as info:
        check_command_line("train", ["-m", "model=GN1,GN2X"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("salt: error: model=GN1,GN2X: no option 'GN2X'")
    with pytest.raises(ConfigError):  # debug=true: the error with its traceback
        check_command_line("train", ["model=GN2X", "debug=true"])
    # --config-dir/-cd and --config-name/-cn as hydra.main reads them
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("evaluate", overrides=["run_dir=x"])
    OmegaConf.save(cfg, tmp_path / "myeval.yaml")
    check_command_line("train", ["-cd", str(tmp_path), "-cn", "myeval", "f_c=0.1"])
    with pytest.raises(SystemExit):
        check_command_line("train", ["-cd", str(tmp_path), "-cn", "myeval", "f_cc=0.1"])
    assert "did you mean f_c?" in capsys.readouterr().err


# ---- every key of every config group, with a value of the wrong type --------------------------
GROUP_OPTIONS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("model", "attention", "pooling", "logger", "data")
}
COMMAND_SCHEMAS = {"evaluate": EvaluateConfig, "export": ExportConfig}


def _leaves(node: Any, keys: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every key path of a plain config (label maps have int keys), with its value (mappings
    too, before their keys)."""
    for key, value in node.items():
        yield (*keys, key), value
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*keys, key))


def _wrong_type(value: Any) -> Any:
    """A value of another type than ``value``'s, as a user could write it on a command line."""
    if isinstance(value, bool):
        return "maybe"
    if isinstance(value, int | float):
        return "many"
    if isinstance(value, str):
        return {"a": 1}  # a mapping where text is expected
    if isinstance(value, list):
        return "d0"  # text where a list is expected
    if value is None:  # an optional value or sub-config
        return [1, 2]
    return "none_of_these"  # text where a mapping is expected


def _configs_to_walk() -> Iterator[tuple[str, dict[str, Any]]]:
    """The train config with each option of each group (the defaults for the others), and the
    evaluate and export configs, as plain dicts."""
    with initialize_config_dir(str(CONF), version_base=None):
        for group, options in GROUP_OPTIONS.items():
            for option in options:
                cfg = compose("train", overrides=[f"{group}={option}"])
                plain = OmegaConf.to_container(cfg, resolve=False)
                yield "train", {k: v for k, v in plain.items() if k != "hydra"}
        for name in COMMAND_SCHEMAS:
            cfg = compose(name, overrides=["run_dir=logs/some_run"])
            plain = OmegaConf.to_container(cfg, resolve=False)
            yield name, {k: v for k, v in plain.items() if k != "hydra"}


def _read(command: str, plain: dict[str, Any]) -> None:
    if command == "train":
        read_train_config(plain)
    else:
        typed_config.read(COMMAND_SCHEMAS[command], plain, "")


def test_every_key_refuses_a_value_of_the_wrong_type_in_one_line() -> None:
    """Each key of each config (every group option) given a value of another type is one
    ConfigError line naming that key, when the config is read: before anything is written."""
    seen: set[tuple[str, str]] = set()
    missed: list[str] = []
    for command, plain in _configs_to_walk():
        for keys, value in list(_leaves(plain)):
            path, name = ".".join(map(str, keys)), str(keys[-1])
            if (command, path) in seen or "${" in str(value):
                continue  # interpolations follow the key they point to
            seen.add((command, path))
            broken = copy.deepcopy(plain)
            *parents, last = keys
            node = broken
            for part in parents:
                node = node[part]
            node[last] = _wrong_type(value)
            try:
                _read(command, broken)
            except ConfigError as err:
                message = str(err)
                assert "\n" not in message, message
                assert path in message or name in message, (path, message)
                continue
            missed.append(f"{command}: {path}={node[last]!r}")
    assert len(seen) > 150  # the walk reached the model, data, logger and command keys
    assert not missed, "accepted a value of the wrong type: " + "; ".join(missed)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.max_steps=many", "trainer.max_steps"),
        ("trainer.progress_bar=maybe", "trainer.progress_bar"),
        ("optimizer.weight_decay=abc", "optimizer.weight_decay"),
        ("model.attention.type=flash", "model.attention.type"),
        ("model.tasks.jet_classification.hidden_layers=d0", "hidden_layers"),
        ("data.input_map=none_of_these", "data.input_map"),
        ("trainer.devices={a:1}", "trainer.devices"),
        ("name=[1,2]", "name"),
    ],
)
def test_a_wrong_type_on_the_command_line_is_one_line(override: str, named: str) -> None:
    assert named in error("train", override)


def test_a_key_below_a_null_node_names_the_node() -> None:
    message = error("train", "data=ftag", "data.sample.num_jets=10")  # data=ftag: sample null
    assert message.startswith("data.sample.num_jets=10: 'data.sample' is null in this config")


def test_a_null_node_set_whole_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """OmegaConf fails with an AttributeError (a traceback from Hydra) when an override sets a
    null structured node whole; the check names the override and what to do instead."""
    with pytest.raises(SystemExit) as info:
        check_command_line("train", ["data=ftag", "data.sample={num_jets: 10}"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "salt: error: data.sample={num_jets: 10}: data.sample is null in this config and cannot "
        "be set whole from the command line (an OmegaConf limitation); choose the config option "
        "that defines it (e.g. data=sample), or set it in a config file of your own"
    ]
