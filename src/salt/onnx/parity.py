"""Proof that an exported model computes what the checkpoint does: onnxruntime, one jet at a
time on raw values read from a file (as Athena runs it), against the batched torch evaluation
of the same jets.

Probabilities are compared by their largest absolute difference, regression values (in the
targets' units, each denominator the raw jet variable on both sides; a pt in MeV is ~1e5) by
their largest difference relative to max(|torch|, 1): float32 holds 7 digits of either. The
per-track integer outputs must be equal, except where torch itself sits on a tie that float
rounding may break either way: two origin classes within the tolerance, or a same-vertex
probability within the tolerance of the 0.5 threshold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from salt.data.build import make_loader
from salt.data.ftag import DEFAULT_INPUT_MAP, VALID, dataset_of, open_h5
from salt.evaluation.run import LoadedRun
from salt.models.tasks import RegressionTask
from salt.models.vertices import VERTEX_THRESHOLD
from salt.onnx import interface as names
from salt.onnx.model import OnnxTagger, require_onnx


def session(model_bytes: bytes) -> Any:
    """An onnxruntime CPU session of a serialised model (errors only in its log)."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def raw_features(
    file: h5py.File, dataset: str, variables: Sequence[str], rows: slice
) -> np.ndarray:
    """Unnormalised float32 features ``[rows, (slots,) n_vars]`` read with h5py."""
    data = file[dataset].fields(list(variables))[rows]
    return np.stack([data[v].astype(np.float32) for v in variables], axis=-1)


@dataclass
class OutputParity:
    """How one output compares over the jets checked."""

    name: str
    integer: bool
    relative: bool = False  # regression values: |onnxruntime - torch| / max(|torch|, 1)
    max_difference: float = 0.0  # largest |onnxruntime - torch| (relative: see above)
    values: int = 0  # values compared
    differing: int = 0  # integer outputs: tracks that differ
    ties: int = 0  # ... of which at a tie in torch (allowed)

    def passes(self, tolerance: float) -> bool:
        if self.integer:
            return self.differing == self.ties
        return self.max_difference <= tolerance  # False for nan

    def describe(self) -> str:
        if self.relative:
            return f"max |onnxruntime - torch| / max(|torch|, 1) = {self.max_difference:.3g}"
        if not self.integer:
            return f"max |onnxruntime - torch| = {self.max_difference:.3g}"
        text = f"{self.differing} of {self.values} tracks differ"
        return text + (f" ({self.ties} at ties in torch)" if self.ties else "")


@dataclass
class Parity:
    file: Path
    jets: int
    tolerance: float
    outputs: dict[str, OutputParity] = field(default_factory=dict)

    @property
    def max_difference(self) -> float:
        floats = [o.max_difference for o in self.outputs.values() if not o.integer]
        return max(floats, default=0.0)

    def failures(self) -> list[OutputParity]:
        return [o for o in self.outputs.values() if not o.passes(self.tolerance)]

    def report(self) -> str:
        lines = [f"ONNX (one jet at a time) vs torch (batched) on {self.jets} jets of {self.file}:"]
        width = max((len(n) for n in self.outputs), default=0)
        lines += [f"  {n:<{width}}  {o.describe()}" for n, o in self.outputs.items()]
        return "\n".join(lines)


def _difference(reference: np.ndarray, value: np.ndarray, relative: bool = False) -> float:
    """Largest absolute difference (``relative``: over max(|reference|, 1)); inf for a shape
    mismatch or a non-finite value."""
    if reference.shape != value.shape:
        return math.inf
    reference = reference.astype(np.float64)
    diff = np.abs(reference - value.astype(np.float64))
    if relative:
        diff = diff / np.maximum(np.abs(reference), 1.0)
    return float(diff.max(initial=0.0)) if np.isfinite(diff).all() else math.inf


def _torch_outputs(
    wrapper: OnnxTagger,
    run: LoadedRun,
    inputs: dict[str, Tensor],
    masks: dict[str, Tensor],
    raw_jets: Tensor,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The batched evaluation's outputs under the graph's names (jet values ``[B]``, track
    values ``[B, T]``; regression in the targets' units, with the denominators from the raw
    jet features ``raw_jets``), and the tagger's probabilities (for the tie checks)."""
    outputs, _ = run.tagger(inputs, masks)
    result = wrapper.named_outputs(outputs, masks, raw_jets)
    return {f"{wrapper.model_name}_{k}": v for k, v in result.items()}, run.tagger.predict(outputs)


def _tie(
    wrapper: OnnxTagger,
    name: str,
    probs: dict[str, Tensor],
    jet: int,
    real: np.ndarray,
    got: np.ndarray,
    tolerance: float,
) -> np.ndarray:
    """Per real track: whether a differing integer output is a tie torch could break either
    way (see the module docstring)."""
    task_name = dict((f"{wrapper.model_name}_{n}", t) for n, t in wrapper.track_outputs)[name]
    p = probs[task_name][jet].double().cpu().numpy()
    if name.endswith(names.VERTEX_OUTPUT):
        sym = 0.5 * (p + p.T)[np.ix_(real, real)]
        near = np.abs(sym - VERTEX_THRESHOLD) <= tolerance
        return np.full(len(got), near.any())  # one tie may regroup any track of the jet
    p = p[real]
    best = p.max(axis=-1)
    chosen = p[np.arange(len(got)), np.clip(got.astype(np.int64), 0, p.shape[-1] - 1)]
    return best - chosen <= tolerance


@torch.no_grad()
def compare(
    wrapper: OnnxTagger,
    model_bytes: bytes,
    run: LoadedRun,
    file: Path,
    num_jets: int,
    batch_size: int,
    tolerance: float,
) -> Parity:
    """onnxruntime per jet vs batched torch on the first ``num_jets`` jets of ``file``."""
    sess = session(model_bytes)
    input_map = {**DEFAULT_INPUT_MAP, **dict(run.cfg.data.input_map or {})}
    data = dataclasses.replace(run.data_config(), batch_size=batch_size, trim_tracks=False)
    loader = make_loader(
        data,
        [file],
        run.norm_dict,
        variables=run.variables,
        labels={},
        num_jets=num_jets,
        train=False,
        seed=0,
        num_workers=0,
    )
    parity = Parity(file, 0, tolerance)
    # per-track outputs: their object type (the rows of the input sequence they belong to)
    integer = {
        f"{wrapper.model_name}_{n}": run.tagger.tasks[t].input_type
        for n, t in wrapper.track_outputs
    }
    regression = {
        f"{wrapper.model_name}_{wrapper.rename.get(n, n)}"
        for n, t, _ in wrapper.jet_outputs
        if isinstance(run.tagger.tasks[t], RegressionTask)
    }
    for name in wrapper.output_names:
        parity.outputs[name] = OutputParity(name, name in integer, name in regression)
    sequences = wrapper.features[1:]
    offset = 0
    with open_h5(file) as f:
        for batch in loader:
            masks = {k: v.to(run.device) for k, v in batch["pad_masks"].items()}
            inputs = {k: v.to(run.device) for k, v in batch["inputs"].items()}
            rows = slice(offset, offset + len(next(iter(masks.values()))))
            jets = raw_features(f, input_map["jets"], wrapper.jet_columns, rows)
            raw_jets = torch.from_numpy(jets).to(run.device)
            reference, probs = _torch_outputs(wrapper, run, inputs, masks, raw_jets)
            reference = {k: v.float().cpu().numpy() for k, v in reference.items()}
            objects = {
                s.salt: (
                    raw_features(f, dataset_of(input_map, s.salt), run.variables[s.salt], rows),
                    f[dataset_of(input_map, s.salt)].fields(VALID)[rows].astype(bool),
                )
                for s in sequences
            }
            for i in range(rows.stop - rows.start):
                feed = {"jet_features": jets[i : i + 1]}
                for s in sequences:
                    x, valid = objects[s.salt]
                    feed[s.onnx] = x[i][valid[i]]
                got = sess.run(wrapper.output_names, feed)
                for name, value in zip(wrapper.output_names, got, strict=True):
                    out = parity.outputs[name]
                    if not out.integer:
                        diff = _difference(reference[name][i], value, out.relative)
                        out.max_difference = max(out.max_difference, diff)
                        out.values += 1
                        continue
                    real = objects[integer[name]][1][i]
                    expected = reference[name][i][real].astype(np.int64)
                    differs = expected != value.astype(np.int64)
                    out.values += len(expected)
                    if differs.any():
                        out.differing += int(differs.sum())
                        ties = _tie(wrapper, name, probs, i, real, value, tolerance)
                        out.ties += int((differs & ties).sum())
            offset = rows.stop
    parity.jets = offset
    return parity
