"""``python -m salt.onnx_info MODEL.onnx``: what an exported tagger takes and gives.

Prints the model name, where and from which commit it was exported, each input (dtype, shape,
its Athena name and variables), each output, and the normalisation the graph applies.
``--json`` prints the whole ``gnn_config`` metadata; ``--config`` the training config.yaml
stored in it. Reads models of the old tool (salt-ml) too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from salt.errors import ExportError, run_entry_point
from salt.onnx.model import graph_schema, read_gnn_config


def _shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def describe(path: Path) -> str:
    """The text ``salt.onnx_info`` prints for the model at ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected an exported .onnx model)")
    model_bytes = path.read_bytes()
    meta = read_gnn_config(model_bytes, path)
    schema = graph_schema(model_bytes)
    commit = meta.get("salt_export_hash") or "unknown"
    dirty = " with uncommitted changes" if meta.get("forced_export") else ""
    lines = [
        f"{path}: model {meta.get('model_name')} ({meta.get('onnx_model_version', '?')}), "
        f"salt {meta.get('salt_version', '?')} at commit {commit}{dirty}",
        f"checkpoint: {meta.get('ckpt_path')}",
    ]
    # the metadata's inputs in graph order: the jet's, then the sequences
    athena = [*meta.get("inputs", []), *meta.get("input_sequences", [])]
    width = max(len(n) for section in schema.values() for n in section)
    lines.append("inputs:")
    for i, (name, spec) in enumerate(schema["inputs"].items()):
        entry = athena[i] if i < len(athena) else {}
        variables = ", ".join(v["name"] for v in entry.get("variables", []))
        lines.append(
            f"  {name:<{width}}  {spec['dtype']:<8} {_shape(spec['shape']):<16} "
            f"{entry.get('name', '?')}: {variables}"
        )
    lines.append("outputs:")
    for name, spec in schema["outputs"].items():
        lines.append(f"  {name:<{width}}  {spec['dtype']:<8} {_shape(spec['shape'])}")
    for new, terms in meta.get("combine_outputs", []):
        summed = " + ".join(f"{scale:g}*{term}" for scale, term in terms)
        lines.append(f"  combined: {new} = {summed}")
    for old, new in (meta.get("rename_outputs") or {}).items():
        lines.append(f"  renamed: {old} -> {new}")
    norm = meta.get("normalisation")
    if norm:
        lines.append("normalisation in the graph ((x - mean) / std; feed raw values):")
        for input_type, variables in norm.items():
            if isinstance(variables, dict):
                for var, stats in variables.items():
                    lines.append(
                        f"  {input_type}.{var}: mean {stats['mean']:.6g}, std {stats['std']:.6g}"
                    )
    return "\n".join(lines)


def info(args: argparse.Namespace) -> None:
    path = Path(args.model)
    if args.json or args.config:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (expected an exported .onnx model)")
        meta = read_gnn_config(path.read_bytes(), path)
        if args.config:
            config = meta.get("config.yaml")
            if config is None:
                raise ExportError(f"{path}: its gnn_config holds no config.yaml")
            print(yaml.safe_dump(config, sort_keys=False), end="")
        else:
            print(json.dumps(meta, indent=2))
        return
    print(describe(path))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m salt.onnx_info", description=__doc__)
    parser.add_argument("model", help="an exported .onnx model")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="print the whole gnn_config")
    group.add_argument("--config", action="store_true", help="print its training config.yaml")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    args = parser.parse_args(argv)
    run_entry_point(info, _Args(args), (ExportError, FileNotFoundError))


class _Args(argparse.Namespace):
    """The parsed arguments, with the ``get`` `run_entry_point` reads ``debug`` through."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(**vars(args))

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


if __name__ == "__main__":
    main(sys.argv[1:])
