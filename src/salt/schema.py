"""The config schema: each command's primary config as a dataclass of the components' own
configs, registered in Hydra's ConfigStore, so that OmegaConf rejects unknown keys and wrong
types when a command line is composed.

Following a key from `conf/` to what it builds is one hop: `conf/train.yaml` starts from
`train_schema` (`TrainConfig` below); `model.encoder.num_layers` is `EncoderConfig.num_layers`
in `salt.models.transformer`, read by `build_tagger`. Each component checks its own ranges
in `check(where)`; `read_train_config` reads a composed config into these objects once,
before anything is written, and nothing below indexes the config with strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from salt.data.build import DataConfig
from salt.evaluation.settings import EvaluateConfig
from salt.models.tagger import ModelConfig
from salt.onnx.settings import ExportConfig
from salt.tracking.factory import LoggerConfig
from salt.training.config import TrainerConfig
from salt.training.finetune import FinetuneConfig
from salt.training.optim import OptimizerConfig
from salt.utils import typed_config


@dataclass
class TrainConfig:
    """`python -m salt.train` (conf/train.yaml)."""

    name: str = MISSING  # run directory: <log_dir>/<name>_<YYYYmmdd-HHMMSS>
    log_dir: str = "logs"
    seed: int = 42  # python, numpy, torch and the data order
    force: bool = False  # allow uncommitted changes in the salt checkout (disables tag)
    tag: bool = False  # create a git tag named after the run directory and push it
    tag_remote: str = "origin"
    ckpt_path: str | None = None  # start from this checkpoint (new run directory)
    resume: str | None = None  # continue this run directory from its latest checkpoint
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # start from other weights
    debug: bool = False  # full tracebacks for data/config errors
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = MISSING
    logger: LoggerConfig | None = None  # null: no metrics file, plots, comet or TensorBoard

    def check(self, where: str) -> None:
        typed_config.at_least(self.seed, "seed", 0)
        self.trainer.check("trainer")
        self.optimizer.check("optimizer")
        self.finetune.check("finetune")
        self.data.check("data")
        self.model.check("model")
        if self.logger is not None:
            self.logger.check("logger")


def read_train_config(cfg: TrainConfig | DictConfig | dict[str, Any]) -> TrainConfig:
    """A composed (or saved) training config as a checked `TrainConfig`; a wrong key, type or
    value is one ConfigError naming it."""
    if isinstance(cfg, DictConfig) and "hydra" in cfg:
        cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    return typed_config.read(TrainConfig, cfg, "")


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (the primary configs' `defaults` name them)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="export_schema", node=ExportConfig)


register()
