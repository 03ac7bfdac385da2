"""The `salt.export` config (conf/export.yaml): its types and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from salt.errors import ConfigError
from salt.onnx import interface
from salt.utils import typed_config as check


@dataclass
class ParityConfig:
    """onnxruntime, one jet at a time, against batched torch on real jets, before anything is
    written."""

    file: str | None = None  # default: the run's test file (else its validation file)
    num_jets: int = 1000
    batch_size: int = 250  # the torch side's batches
    tolerance: float = 1.0e-5  # largest allowed |onnxruntime - torch| of a float output

    def check(self, where: str) -> None:
        check.positive(self.num_jets, f"{where}.num_jets")
        check.positive(self.batch_size, f"{where}.batch_size")
        if not self.tolerance > 0:
            raise ConfigError(f"{where}.tolerance={self.tolerance}: expected a number > 0.")


@dataclass
class ExportConfig:
    run_dir: str | None = None
    ckpt_path: str | None = None
    output: str | None = None  # default: <run_dir>/network.onnx, as the old tool
    name: str | None = None  # the output prefix; default: the model's name without _ and -
    tasks: list[str] = field(default_factory=list)  # empty: the jet-level tasks
    track_selection: str = interface.DEFAULT_TRACK_SELECTION
    combine_outputs: list[str] = field(default_factory=list)  # e.g. ["plight,pu,pg"]
    rename_outputs: list[str] = field(default_factory=list)  # e.g. ["pu:plight"]
    opset: int = 20
    parity: ParityConfig = field(default_factory=ParityConfig)
    overwrite: bool = False
    debug: bool = False

    def check(self, where: str) -> None:
        self.parity.check("parity")
        check.positive(self.opset, "opset")
        interface.check_track_selection(self.track_selection)
        if self.name is not None:
            interface.check_model_name(self.name)
        for spec in self.combine_outputs:
            interface.parse_combination(spec)
        for spec in self.rename_outputs:
            interface.parse_rename(spec)
        if not self.run_dir:
            raise ConfigError("run_dir is required: e.g. run_dir=logs/GN2_20260101-120000")
