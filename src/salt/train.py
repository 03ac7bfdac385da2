r"""``python -m salt.train``: compose the config, then train (one process per device).

Examples::

    python -m salt.train                                   # GN2 on the built-in sample
    python -m salt.train model=GN1 attention=gatv2 pooling=cross_attention
    python -m salt.train trainer.fast_dev_run=2
    python -m salt.train resume=logs/GN2_20260101-120000    # latest complete checkpoint
    python -m salt.train --config-dir logs/<run> --config-name config \
        ckpt_path=logs/<run>/ckpts/last.ckpt
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from salt.config_check import command
from salt.errors import USER_ERRORS, ConfigError, Interrupted, StagingInterrupted
from salt.schema import TrainConfig, read_train_config
from salt.signals import ignore_ctrl_c
from salt.training import checkpoint as ckpt
from salt.training.config import TrainerConfig
from salt.training.distributed import (
    REPORTED_EXIT_CODE,
    SPAWNED_ENV,
    cleanup,
    detect_environment,
    init_distributed,
    num_processes,
    spawn,
)
from salt.training.kept import Kept
from salt.training.run_dir import load_run_config
from salt.utils.typed_config import omegaconf_message

log = logging.getLogger("salt")
GROUPS = ("data", "model", "attention", "pooling", "logger")
LAUNCH_KEYS = ("resume", "launcher", "hydra")  # where this invocation runs, not what it trains


def resume_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``resume=<run dir>``: that run's config, this command line's key overrides on top,
    and its latest complete checkpoint."""
    run_dir = Path(str(cfg.resume))
    found = ckpt.latest_checkpoint(run_dir / "ckpts")
    if found is None:
        raise ckpt.CheckpointError(f"{run_dir / 'ckpts'}: no complete checkpoint to resume from.")
    base = load_run_config(run_dir)
    # Hydra's own grammar: 1e-3 is a float, null is None, ~key deletes, [a,b] is a list
    changes = []
    for item, override in zip(
        overrides, OverridesParser.create().parse_overrides(overrides), strict=True
    ):
        key = override.key_or_group
        if key.split("/")[0].split(".")[0] in LAUNCH_KEYS:
            continue
        if key in GROUPS:
            raise ConfigError(
                f"'{item}': resume={run_dir} continues that run with its own {key} config; "
                "change keys (e.g. trainer.max_epochs=30), not groups."
            )
        if override.is_sweep_override():
            raise ConfigError(f"'{item}': resume takes one value per key, not a sweep.")
        if override.is_delete():  # on the saved config: the key takes the schema's default
            _delete(base, key, item, run_dir)
        else:
            changes.append((item, key, override.value()))
    # typed by the schema, as a fresh run's config: a run saved before a key was added gets
    # its default, and each override is converted to (or refused as) the key's type
    try:
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), base)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{run_dir / 'config.yaml'}: {omegaconf_message(err)}") from None
    for item, key, value in changes:
        try:
            OmegaConf.update(typed, key, value, merge=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"'{item}': {omegaconf_message(err)}") from None
    typed.ckpt_path = str(found)
    typed.resume = None
    return typed


def _delete(cfg: DictConfig, key: str, item: str, run_dir: Path) -> None:
    """`~key`: remove `key` from the resumed run's config (as Hydra deletes it)."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or name not in parent:
        raise ConfigError(f"'{item}': {run_dir}/config.yaml has no key {key!r} to delete.")
    with open_dict(parent):
        del parent[name]


def world_size(trainer: TrainerConfig) -> int:
    """The processes `trainer.devices` asks for on this node: the rule `init_distributed`
    applies (salt.training.distributed.num_processes), so a bad setting fails before `spawn`."""
    return num_processes(trainer.devices, trainer.accelerator)


def _worker(rank: int, cfg: TrainConfig) -> None:
    from salt.training.loop import fit

    launch = detect_environment()
    rank = launch["rank"] if launch is not None else rank  # launched ranks all get rank=0 here
    spawned = bool(os.environ.get(SPAWNED_ENV))
    try:
        try:
            timeout = datetime.timedelta(seconds=cfg.trainer.ddp_timeout_s)
            fit(cfg, init_distributed(cfg.trainer.devices, cfg.trainer.accelerator, timeout))
        except KeyboardInterrupt:  # before fit took Ctrl-C over: nothing was written
            raise Interrupted(signal.SIGINT, Kept().interrupted(None, again=False)) from None
    except (Interrupted, StagingInterrupted) as err:
        ignore_ctrl_c()  # the run is over: one more Ctrl-C must not turn the exit into a traceback
        err.reported = getattr(err, "reported", False) or rank != 0  # rank 0 says what was kept
        if not spawned:
            raise  # reported by main()
        if not err.reported:
            print(f"salt: {err}", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
    except USER_ERRORS as err:
        if cfg.debug or (rank == 0 and launch is None):
            raise  # reported by main()
        # a spawned or launched rank: one clear line, then a non-zero exit for the launcher
        if not getattr(err, "reported", False):  # another rank speaks for this failure
            print(f"salt: error on rank {rank}: {err}", file=sys.stderr, flush=True)
        sys.exit(REPORTED_EXIT_CODE if spawned else 1)
    finally:
        cleanup()


def train(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Train with a composed config: spawns one process per device when needed.

    ``overrides`` (default: this command line's) are applied on top of a resumed run's config.
    """
    if cfg.get("resume"):
        if overrides is None:
            overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        cfg = resume_config(cfg, overrides)
    config = read_train_config(cfg)  # every key checked, before anything is written
    n = world_size(config.trainer)
    if n > 1 and detect_environment() is None:
        spawn(_worker, n, (config,))
    else:
        _worker(0, config)


main = command("train", train)

if __name__ == "__main__":
    main()
