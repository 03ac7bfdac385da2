"""The `salt.evaluate` and `salt.export` configs (conf/evaluate.yaml, conf/export.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from salt.errors import ConfigError
from salt.utils import typed_config as check


def _run_dir(run_dir: str | None) -> None:
    if not run_dir:
        raise ConfigError("run_dir is required: e.g. run_dir=logs/GN2_20260101-120000")


def _variable_names(names: list[str] | None, key: str) -> None:
    """Variable names, not numbers: OmegaConf turns ``key=[1,2]`` into ['1', '2'] silently."""
    for name in names or ():
        if not name.strip() or name.lstrip("+-").replace(".", "", 1).isdigit():
            raise ConfigError(
                f"{key}: {name!r} is not a variable name; expected names such as pt_btagJes."
            )


@dataclass
class EvaluationDataConfig:
    """`data` of an evaluation: the rest comes from the run's own config."""

    test_file: str | None = None  # default: the run's data.test_file
    num_test: int = -1  # the first N jets (-1: all)
    test_suffix: str = ""  # appended to the output name
    batch_size: int | None = None  # default: the run's data.batch_size

    def check(self, where: str) -> None:
        if self.num_test == 0 or self.num_test < -1:
            raise ConfigError(
                f"{where}.num_test={self.num_test}: use -1 (all jets) or a positive number."
            )
        check.positive(self.batch_size, f"{where}.batch_size", allow_none=True)


@dataclass
class EvaluateConfig:
    run_dir: str | None = None  # the training run directory (logs/<name>_<stamp>)
    ckpt_path: str | None = None  # default: the checkpoint with the lowest validation loss
    data: EvaluationDataConfig = field(default_factory=EvaluationDataConfig)
    write_tracks: bool = False  # per-object outputs and truth: `tracks` (and `flows`...)
    extra_jet_vars: list[str] | None = None  # None: every variable of the test file's jets
    extra_track_vars: list[str] = field(default_factory=list)  # non-empty: writes `tracks`
    half_precision: bool = False  # predictions as float16 (copied variables keep their type)
    f_c: float = 0.2  # D_b = ln(p_b / (f_c p_c + f_tau p_tau + (1 - f_c - f_tau) p_u))
    f_tau: float = 0.0
    working_points: list[float] = field(default_factory=lambda: [60.0, 70.0, 77.0, 85.0])
    overwrite: bool = False  # replace existing outputs
    device: str = "auto"  # auto | cpu | cuda | cuda:<index>
    progress_bar: bool = True
    debug: bool = False

    @property
    def tracks(self) -> bool:
        """Whether the predictions file gets a `tracks` dataset: track variables asked for are
        written there, so asking for them writes it (with the track outputs and truth)."""
        return self.write_tracks or bool(self.extra_track_vars)

    def check(self, where: str) -> None:
        from salt.evaluation.performance import check_settings

        check_settings(self.f_c, self.working_points, self.f_tau)
        _variable_names(self.extra_jet_vars, "extra_jet_vars")
        _variable_names(self.extra_track_vars, "extra_track_vars")
        self.data.check("data")
        _run_dir(self.run_dir)
