r"""``python -m salt.export``: an ONNX model of a trained run for ATLAS's inference code.

Examples::

    python -m salt.export run_dir=logs/GN2_20260101-120000          # -> logs/<run>/network.onnx
    python -m salt.export run_dir=logs/<run> tasks=[jet_classification,track_origin,track_vertexing]
    python -m salt.export run_dir=logs/<run> name=GN2v01 track_selection=r22default \
        combine_outputs=["plight,pu,ptau"] rename_outputs=["pu:plight"] output=GN2v01.onnx

The model takes one jet at a time, as the old tool's does (`salt.onnx.interface`): raw jet
features and the jet's tracks, normalisation inside the graph; its outputs are
``<name>_pb``... and, for the track tasks asked for, ``<name>_TrackOrigin`` and
``<name>_VertexIndex``. Before the file is written, onnxruntime is run jet by jet on real jets of
the test file (or ``parity.file``) and compared with the batched torch evaluation; the largest
difference of each output is printed, and above ``parity.tolerance`` nothing is written.
Needs ``pip install onnx onnxruntime``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from salt.config_check import command
from salt.data.build import DataConfig
from salt.data.ftag import open_h5
from salt.errors import RERUN_ADVICE, ConfigError, ExportError
from salt.evaluation.run import (
    LoadedRun,
    choose_checkpoint,
    load_run,
    resolve_test_file,
    run_config,
    single_file,
)
from salt.onnx import interface
from salt.onnx.model import OnnxTagger, export_bytes, require_onnx
from salt.onnx.parity import Parity, compare
from salt.onnx.settings import ExportConfig
from salt.provenance import git_state
from salt.utils import typed_config
from salt.utils.atomic import OutputSet

# where else a read-only output directory lets an export write its model
ELSEWHERE = "pass output=<path in a writable directory>"
DEFAULT_NAME = "network.onnx"  # the old tool's, in the run directory


@dataclass
class ExportResult:
    path: Path
    parity: Parity

    @property
    def max_difference(self) -> float:
        return self.parity.max_difference


def parity_file(run_data: DataConfig, given: str | None) -> Path:
    """``parity.file`` if given, else the run's test file, else its validation file."""
    if given:
        return single_file(given, "parity.file")
    try:
        return resolve_test_file(run_data, None)
    except ConfigError:
        if run_data.val_file:
            return single_file(run_data.val_file, "data.val_file (from the run's config)")
        raise ConfigError(
            "no file for the parity check: the run has no test or validation file; pass "
            "parity.file=path/to/file.h5"
        ) from None


def jets_in(path: Path, dataset: str) -> int:
    with open_h5(path) as f:
        if dataset not in f:
            raise ConfigError(f"{path}: no dataset '{dataset}' for the parity check.")
        return len(f[dataset])


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def metadata(wrapper: OnnxTagger, run: LoadedRun, options: dict[str, Any]) -> dict[str, Any]:
    """The model's ``gnn_config``: the old tool's keys, the run's config.yaml and
    metadata.yaml (secret-free copies written by training), salt's commit."""
    state = git_state()
    extra = {
        "config.yaml": _yaml(run.run_dir / "config.yaml"),
        "metadata.yaml": _yaml(run.run_dir / "metadata.yaml"),
        "export_options": options,  # what salt.onnx_compare rebuilds the wrapper from
    }
    return wrapper.gnn_config(run, state.commit, state.dirty, extra)


def build_wrapper(run: LoadedRun, options: dict[str, Any]) -> OnnxTagger:
    """The wrapper for ``options`` (the export keys that shape the graph)."""
    return OnnxTagger(
        run,
        name=options.get("name"),
        tasks=options.get("tasks"),
        track_selection=options.get("track_selection", interface.DEFAULT_TRACK_SELECTION),
        combine=[interface.parse_combination(c) for c in options.get("combine_outputs", [])],
        rename=dict(interface.parse_rename(r) for r in options.get("rename_outputs", [])),
    )


def export(config: ExportConfig | DictConfig) -> ExportResult:
    """Export ``cfg.run_dir``'s checkpoint to ONNX after a parity check against torch."""
    cfg = typed_config.read(ExportConfig, config, "")
    run_dir = Path(str(cfg.run_dir))
    run_data = run_config(run_dir).data
    ckpt_path = choose_checkpoint(run_dir, cfg.ckpt_path)
    out = Path(cfg.output) if cfg.output else run_dir / DEFAULT_NAME
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists; pass overwrite=true to replace it, or output=...")
    require_onnx()  # before the model is built: a missing package is reported at once
    OutputSet(ELSEWHERE).check_writable(out)  # so is a directory salt cannot write

    run = load_run(run_dir, ckpt_path, "cpu")  # export and reference both on the CPU
    options = {
        "name": cfg.name,
        "tasks": list(cfg.tasks) if cfg.tasks else None,
        "track_selection": cfg.track_selection,
        "combine_outputs": list(cfg.combine_outputs),
        "rename_outputs": list(cfg.rename_outputs),
    }
    wrapper = build_wrapper(run, options)
    model_bytes = export_bytes(wrapper, metadata(wrapper, run, options), cfg.opset)

    check_file = parity_file(run_data, cfg.parity.file)
    num_jets = min(cfg.parity.num_jets, jets_in(check_file, run.data_config().input_map["jets"]))
    result = compare(
        wrapper, model_bytes, run, check_file, num_jets, cfg.parity.batch_size, cfg.parity.tolerance
    )
    print(f"salt: {result.report()}", flush=True)
    if failures := result.failures():
        raise ExportError(
            f"ONNX parity check failed for {', '.join(f.name for f in failures)} "
            f"({failures[0].describe()}; parity.tolerance={cfg.parity.tolerance:g}); "
            f"{out} was not written."
        )
    with OutputSet(ELSEWHERE) as outputs:  # a failed write leaves no partial model
        with outputs.file(out) as tmp:
            tmp.write_bytes(model_bytes)
        outputs.commit()
    print(
        f"salt: ONNX model {wrapper.model_name} written to {out} (inputs "
        f"{', '.join(wrapper.input_names)}; outputs {', '.join(wrapper.output_names)})",
        flush=True,
    )
    return ExportResult(out, result)


main = command("export", export, (ExportError,), disk_full_advice=RERUN_ADVICE)

if __name__ == "__main__":
    main()
