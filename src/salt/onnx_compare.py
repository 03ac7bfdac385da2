"""``python -m salt.onnx_compare MODEL.onnx``: an exported model against its checkpoint.

Runs the model with onnxruntime one jet at a time over a test file, as ATLAS's inference does,
and the checkpoint it was exported from with torch in batches, and prints the largest difference
per output (per-track classes and vertex groups: the tracks that differ). Exits 1 when an output
is above ``--tolerance``. The checkpoint, the run and the export options are read from the
model's metadata; ``--ckpt`` points to the checkpoint when the run directory moved.

Example::

    python -m salt.onnx_compare logs/<run>/network.onnx --file /data/pp_output_test_zprime.h5
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from salt.errors import ConfigError, ExportError, run_entry_point
from salt.evaluation.run import load_run, resolve_test_file, single_file
from salt.export import build_wrapper, jets_in
from salt.onnx.model import read_gnn_config
from salt.onnx.parity import compare
from salt.onnx_info import _Args


def _checkpoint(meta: dict, given: str | None, model: Path) -> Path:
    path = Path(given or meta.get("ckpt_path") or "")
    if not given and not meta.get("ckpt_path"):
        raise ExportError(f"{model}: its metadata names no checkpoint; pass --ckpt")
    if not path.is_file():
        where = "--ckpt" if given else f"the checkpoint {model} was exported from"
        raise FileNotFoundError(
            f"{path}: no such file ({where}); pass --ckpt logs/<run>/ckpts/<checkpoint>.ckpt"
        )
    return path


def run_compare(args: argparse.Namespace) -> None:
    model = Path(args.model)
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no such file (expected an exported .onnx model)")
    model_bytes = model.read_bytes()
    meta = read_gnn_config(model_bytes, model)
    options = meta.get("export_options")
    if options is None:
        raise ExportError(
            f"{model}: no export_options in its metadata: exported by another tool; "
            "export the checkpoint again with python -m salt.export"
        )
    ckpt_path = _checkpoint(meta, args.ckpt, model)
    run_dir = Path(args.run_dir) if args.run_dir else ckpt_path.parent.parent
    run = load_run(run_dir, ckpt_path, "cpu")
    wrapper = build_wrapper(run, options)
    if wrapper.output_names != meta.get("output_names"):
        raise ConfigError(
            f"{model}: its outputs {meta.get('output_names')} are not what {ckpt_path} with its "
            f"export options gives ({wrapper.output_names}); is --ckpt the right checkpoint?"
        )
    test_file = (
        single_file(args.file, "--file") if args.file else resolve_test_file(run.cfg.data, None)
    )
    available = jets_in(test_file, run.data_config().input_map["jets"])
    num_jets = available if args.num_jets < 0 else min(args.num_jets, available)
    result = compare(
        wrapper, model_bytes, run, test_file, num_jets, args.batch_size, args.tolerance
    )
    print(result.report(), flush=True)
    if failures := result.failures():
        names = ", ".join(f.name for f in failures)
        raise ExportError(
            f"{model} differs from {ckpt_path} above --tolerance={args.tolerance:g} in {names}"
        )
    print(f"salt: {model} equals {ckpt_path} within {args.tolerance:g}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m salt.onnx_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="an ONNX model written by python -m salt.export")
    parser.add_argument("--ckpt", help="the checkpoint (default: the one in the metadata)")
    parser.add_argument("--run-dir", help="its run directory (default: the checkpoint's)")
    parser.add_argument("--file", help="the test file (default: the run's test file)")
    parser.add_argument("--num-jets", type=int, default=10_000, help="-1: all (default 10000)")
    parser.add_argument("--batch-size", type=int, default=250, help="torch's batches")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    args = parser.parse_args(argv)
    if args.num_jets == 0 or args.batch_size <= 0 or not args.tolerance > 0:
        parser.error("--num-jets must be -1 or > 0, --batch-size and --tolerance > 0")
    run_entry_point(run_compare, _Args(args), (ExportError, FileNotFoundError))


if __name__ == "__main__":
    main(sys.argv[1:])
