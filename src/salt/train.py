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

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from salt.config_check import command
from salt.errors import USER_ERRORS
from salt.training import checkpoint as ckpt
from salt.training.distributed import (
    REPORTED_EXIT_CODE,
    SPAWNED_ENV,
    cleanup,
    detect_environment,
    init_distributed,
    num_processes,
    spawn,
)
from salt.training.run_dir import load_run_config

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
    for item, override in zip(
        overrides, OverridesParser.create().parse_overrides(overrides), strict=True
    ):
        key = override.key_or_group
        if key.split("/")[0].split(".")[0] in LAUNCH_KEYS:
            continue
        if key in GROUPS:
            raise ValueError(
                f"'{item}': resume={run_dir} continues that run with its own {key} config; "
                "change keys (e.g. trainer.max_epochs=30), not groups."
            )
        if override.is_sweep_override():
            raise ValueError(f"'{item}': resume takes one value per key, not a sweep.")
        if override.is_delete():
            _delete(base, key, item, run_dir)
            continue
        # the run's saved config may predate keys added since: keys may be added without +
        OmegaConf.update(base, key, override.value(), merge=True, force_add=True)
    base.ckpt_path = str(found)
    base.resume = None
    return base


def _delete(cfg: DictConfig, key: str, item: str, run_dir: Path) -> None:
    """`~key`: remove `key` from the resumed run's config (as Hydra deletes it)."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or name not in parent:
        raise ValueError(f"'{item}': {run_dir}/config.yaml has no key {key!r} to delete.")
    with open_dict(parent):
        del parent[name]


def world_size(cfg: DictConfig) -> int:
    """The processes `trainer.devices` asks for on this node: the rule `init_distributed`
    applies (salt.training.distributed.num_processes), so a bad setting fails before `spawn`."""
    devices = cfg.trainer.devices
    accelerator = str(cfg.trainer.accelerator)
    return num_processes(devices, accelerator)


def _worker(rank: int, cfg_dict: dict[str, Any]) -> None:
    from salt.training.loop import fit

    cfg = OmegaConf.create(cfg_dict)
    dist = init_distributed(cfg.trainer.devices, str(cfg.trainer.accelerator))
    try:
        fit(cfg, dist)
    except USER_ERRORS as err:
        if cfg.get("debug") or (rank == 0 and detect_environment() is None):
            raise  # reported by main()
        # a spawned or launched rank: one clear line, then a non-zero exit for the launcher
        print(f"salt: error on rank {dist.rank}: {err}", file=sys.stderr, flush=True)
        sys.exit(REPORTED_EXIT_CODE if os.environ.get(SPAWNED_ENV) else 1)
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
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    n = world_size(cfg)
    if n > 1 and detect_environment() is None:
        spawn(_worker, n, (cfg_dict,))
    else:
        _worker(0, cfg_dict)


main = command("train", train)

if __name__ == "__main__":
    main()
