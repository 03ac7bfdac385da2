"""``build_logger``: the ``logger`` config group (``conf/logger/*.yaml``) to a :class:`Logger`.

``type: local`` writes the metrics file and plots; ``type: comet`` writes those too and logs to
comet; ``type: none`` (or no config at all, as in ``fast_dev_run``) records nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from salt.errors import LoggerConfigError
from salt.tracking.base import Logger, MultiLogger, NullLogger

COMMON_KEYS = {"type": str, "log_every_n_steps": int, "plots": bool}
# Per type: the keys it accepts besides the common ones, with the expected type.
TYPE_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "none": {},
    "local": {},
    "comet": {"project_name": str, "workspace": (str, type(None)), "offline": bool},
}


def _as_dict(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise LoggerConfigError(f"logger: expected a mapping, got {type(cfg).__name__}")


def _validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check the keys and their types; returns the config with defaults filled in."""
    valid_types = ", ".join(TYPE_KEYS)
    kind = cfg.get("type")
    if kind not in TYPE_KEYS:
        raise LoggerConfigError(
            f"logger.type = {kind!r}: expected one of {valid_types} (conf/logger/<type>.yaml)"
        )
    schema: dict[str, Any] = {**COMMON_KEYS, **TYPE_KEYS[kind]}
    for key, value in cfg.items():
        if key not in schema:
            raise LoggerConfigError(
                f"logger.{key}: unknown key for logger.type={kind}; valid keys: "
                f"{', '.join(sorted(schema))}"
            )
        expected = schema[key]
        # bool is an int subclass: `log_every_n_steps: true` must not pass as 1.
        wrong_bool = isinstance(value, bool) and expected is int
        if wrong_bool or not isinstance(value, expected):
            names = (
                expected.__name__
                if isinstance(expected, type)
                else " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            )
            raise LoggerConfigError(f"logger.{key} = {value!r}: expected {names}")
    every = cfg.setdefault("log_every_n_steps", 50)
    if every < 1:
        raise LoggerConfigError(f"logger.log_every_n_steps = {every}: expected an integer >= 1")
    cfg.setdefault("plots", True)
    return cfg


def build_logger(
    cfg: DictConfig | Mapping[str, Any] | None,
    run_dir: Path,
    *,
    run_name: str,
    resume_state: Mapping[str, Any] | None = None,
) -> Logger:
    """The logger for this run; call on rank 0 only (other ranks use :class:`NullLogger`).

    ``resume_state`` is the ``state_dict()`` of the previous run's logger, from its checkpoint:
    the metrics history is copied into the new run directory and comet continues the same
    experiment.
    """
    if cfg is None:
        return NullLogger()
    conf = _validate(_as_dict(cfg))
    if conf["type"] == "none":
        return NullLogger()
    # Imported here so `logger=none` never pays for matplotlib (or comet_ml) imports.
    from salt.tracking.metrics import LocalLogger

    local = LocalLogger(Path(run_dir), plots=conf["plots"], resume_state=resume_state)
    if conf["type"] == "local":
        return local
    from salt.tracking.comet import CometLogger

    try:
        comet = CometLogger(
            Path(run_dir),
            run_name=run_name,
            project_name=conf.get("project_name", "salt"),
            workspace=conf.get("workspace"),
            offline=conf.get("offline", False),
            resume_state=resume_state,
        )
    except BaseException:
        local.finalize("failed")  # close the metrics file before the error propagates
        raise
    return MultiLogger([local, comet])
