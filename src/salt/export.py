r"""``python -m salt.export``: an ONNX model of a trained run, checked against torch.

Examples::

    python -m salt.export run_dir=logs/GN2_20260101-120000      # -> ckpts/<best ckpt>.onnx
    python -m salt.export run_dir=logs/<run> ckpt_path=logs/<run>/ckpts/last.ckpt \
        output=GN2.onnx parity.file=/data/pp_output_test_ttbar.h5

The model takes raw (unnormalised) jet and track features and the track padding mask, applies
the run's normalisation inside the graph and returns named probabilities; the variable lists
and the normalisation are in its metadata (see `salt.evaluation.onnx_model`). Before the file
is written, onnxruntime's outputs are compared with torch's on real jets of the test file (or
``parity.file``); the largest difference is printed, and above ``parity.tolerance`` nothing is
written. Needs ``pip install onnx onnxruntime``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from salt.config_check import command
from salt.data.build import DataConfig
from salt.data.ftag import open_h5
from salt.errors import RERUN_ADVICE, ConfigError
from salt.evaluation.onnx_model import (
    ExportError,
    ONNXTagger,
    export_bytes,
    parity,
    require_onnx,
)
from salt.evaluation.run import (
    choose_checkpoint,
    load_run,
    resolve_test_file,
    run_config,
    single_file,
)
from salt.evaluation.settings import ExportConfig
from salt.utils import typed_config
from salt.utils.atomic import OutputSet

# where else a read-only output directory lets an export write its model
ELSEWHERE = "pass output=<path in a writable directory>"


@dataclass
class ExportResult:
    path: Path
    max_difference: float
    parity_file: Path
    parity_jets: int


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


def _jets_in(path: Path, dataset: str) -> int:
    with open_h5(path) as f:
        if dataset not in f:
            raise ConfigError(f"{path}: no dataset '{dataset}' for the parity check.")
        return len(f[dataset])


def export(config: ExportConfig | DictConfig) -> ExportResult:
    """Export ``cfg.run_dir``'s checkpoint to ONNX after a parity check against torch."""
    cfg = typed_config.read(ExportConfig, config, "")
    run_dir = Path(str(cfg.run_dir))
    run_data = run_config(run_dir).data
    ckpt_path = choose_checkpoint(run_dir, cfg.ckpt_path)
    out = Path(cfg.output) if cfg.output else ckpt_path.with_suffix(".onnx")
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists; pass overwrite=true to replace it, or output=...")
    tolerance, num_jets, batch_size = (
        cfg.parity.tolerance,
        cfg.parity.num_jets,
        cfg.parity.batch_size,
    )
    require_onnx()  # before the model is built: a missing package is reported at once
    OutputSet(ELSEWHERE).check_writable(out)  # so is a directory salt cannot write

    run = load_run(run_dir, ckpt_path, "cpu")  # export and reference both on the CPU
    wrapper = ONNXTagger(run, run_data.input_map)
    model_bytes = export_bytes(wrapper, ckpt_path, cfg.opset)

    check_file = parity_file(run_data, cfg.parity.file)
    num_jets = min(num_jets, _jets_in(check_file, wrapper.input_map["jets"]))
    diffs = parity(wrapper, model_bytes, run, check_file, num_jets, batch_size)
    worst_name = max(diffs, key=lambda k: diffs[k])
    worst = diffs[worst_name]
    print(f"salt: ONNX parity on {num_jets} jets of {check_file}:", flush=True)
    for name, value in diffs.items():
        print(f"  {name:<40} max |onnxruntime - torch| = {value:.3g}", flush=True)
    if not worst <= tolerance:  # also catches nan
        raise ExportError(
            f"ONNX parity check failed: largest difference {worst:.3g} (output {worst_name}) "
            f"exceeds parity.tolerance={tolerance:g}; {out} was not written."
        )
    with OutputSet(ELSEWHERE) as outputs:  # a failed write leaves no partial model
        with outputs.file(out) as tmp:
            tmp.write_bytes(model_bytes)
        outputs.commit()
    print(f"salt: largest difference {worst:.3g}; ONNX model written to {out}", flush=True)
    return ExportResult(out, worst, check_file, num_jets)


main = command("export", export, (ExportError,), disk_full_advice=RERUN_ADVICE)

if __name__ == "__main__":
    main()
