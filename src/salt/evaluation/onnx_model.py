"""ONNX export of a tagger: raw inputs in, named probabilities out, the normalisation inside.

Inputs (float32 unless noted; ``batch`` and ``tracks`` are dynamic axes):

- ``jet_features`` ``[batch, n_jet_vars]`` (when the model has jet variables),
- ``track_features`` ``[batch, tracks, n_track_vars]``,
- ``track_mask`` ``[batch, tracks]`` bool, True for padded slots,
- ``global_features`` ``[batch, n_global_vars]`` (GN2Cat-style models only),

all *raw* (unnormalised), variables in the order of the metadata's ``variables``. The graph
applies the run's norm_dict (``(x - mean) / std``, padded track slots zeroed), exactly as the
training loader does, so the metadata and the graph cannot disagree.

Outputs: ``<model>_p<class>`` ``[batch]`` for each class of the jet classification task, and
``<model>_<task>`` for every other task: track classification ``[batch, tracks, classes]``,
vertexing ``[batch, tracks, tracks]`` (same-vertex probabilities), jet regression ``[batch]``,
other jet classification ``[batch, classes]``.

Metadata (``metadata_props``, JSON strings where structured): ``model_name``, ``salt_version``,
``variables``, ``inputs``, ``outputs``, ``norm_dict``, ``class_names``, ``input_map``,
``checkpoint``.

The exporter is torch's TorchScript-based one (``dynamo=False``): it needs only ``onnx`` and
``onnxruntime``, while the default dynamo exporter also needs ``onnxscript``. The graph is traced
from the tagger's padded path (its packed path has shapes that depend on the batch); the parity
check compares it with the default torch path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor, nn

import salt
from salt.data.build import make_loader
from salt.data.ftag import DEFAULT_INPUT_MAP, VALID, norm_arrays, open_h5
from salt.errors import ExportError
from salt.evaluation.run import LoadedRun
from salt.models.tasks import ClassificationTask, VertexingTask

INPUT_NAMES = {"jets": "jet_features", "tracks": "track_features", "global": "global_features"}
MASK_NAME = "track_mask"
OPSET = 17
INSTALL_HINT = "ONNX export needs the onnx and onnxruntime packages: pip install onnx onnxruntime"


def require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or one clear error saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"{INSTALL_HINT} ({err})") from None
    return onnx, onnxruntime


class ONNXTagger(nn.Module):
    """The tagger with the normalisation in front and flat, named outputs behind."""

    def __init__(
        self,
        run: LoadedRun,
        input_map: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.tagger = run.tagger
        self.model_name = run.name
        self.input_map = {**DEFAULT_INPUT_MAP, **dict(input_map or {})}
        self.variables = {k: list(v) for k, v in run.variables.items() if v}
        if "tracks" not in self.variables:
            raise ExportError(f"model {self.model_name} has no track variables to export.")
        self.input_types = [t for t in ("jets", "tracks", "global") if t in self.variables]
        self.norm: dict[str, dict[str, dict[str, float]]] = {}
        for input_type in self.input_types:
            names = self.variables[input_type]
            mean, inv_std = norm_arrays(
                run.norm_dict, input_type, self.input_map[input_type], names, "norm_dict"
            )
            self.register_buffer(f"mean_{input_type}", torch.from_numpy(mean))
            self.register_buffer(f"inv_std_{input_type}", torch.from_numpy(inv_std))
            # the metadata carries the norm_dict's own numbers (the graph holds float32 copies)
            key = input_type if input_type in run.norm_dict else self.input_map[input_type]
            section = run.norm_dict[key]
            self.norm[input_type] = {
                v: {"mean": float(section[v]["mean"]), "std": float(section[v]["std"])}
                for v in names
            }
        self.jet_task = run.tagger.flavour_task()
        self.outputs: list[tuple[str, str, int | None]] = []  # (name, task, class column)
        for name, task in run.tagger.tasks.items():
            if task is self.jet_task:
                assert isinstance(task, ClassificationTask)
                for i, cls in enumerate(task.class_names or []):
                    self.outputs.append((f"{self.model_name}_p{cls}", name, i))
            else:
                self.outputs.append((f"{self.model_name}_{name}", name, None))

    @property
    def input_names(self) -> list[str]:
        names = [INPUT_NAMES[t] for t in self.input_types if t != "global"]
        names.insert(names.index(INPUT_NAMES["tracks"]) + 1, MASK_NAME)
        if "global" in self.input_types:
            names.append(INPUT_NAMES["global"])
        return names

    @property
    def output_names(self) -> list[str]:
        return [name for name, _, _ in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in self.input_names}
        axes[INPUT_NAMES["tracks"]][1] = "tracks"
        axes[MASK_NAME][1] = "tracks"
        for name, task, _ in self.outputs:
            axes[name] = {0: "batch"}
            if self.tagger.tasks[task].input_type == "tracks":
                axes[name][1] = "tracks"
                if isinstance(self.tagger.tasks[task], VertexingTask):
                    axes[name][2] = "tracks"
        return axes

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        named = dict(zip(self.input_names, args, strict=True))
        mask = named[MASK_NAME].to(torch.bool)
        inputs: dict[str, Tensor] = {}
        for input_type in self.input_types:
            x = named[INPUT_NAMES[input_type]].float()
            x = (x - getattr(self, f"mean_{input_type}")) * getattr(self, f"inv_std_{input_type}")
            if input_type == "tracks":
                x = x.masked_fill(mask.unsqueeze(-1), 0.0)  # as the loader: padded slots zero
            inputs[input_type] = x
        outputs, _ = self.tagger(inputs, {"tracks": mask})
        return self.select(self.tagger.predict(outputs))

    def select(self, probs: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """The outputs, in `output_names` order, from the tagger's per-task predictions."""
        return tuple(
            probs[task][..., col] if col is not None else probs[task]
            for _, task, col in self.outputs
        )

    def metadata(self, checkpoint: Path) -> dict[str, str]:
        class_names = {
            name: list(task.class_names)
            for name, task in self.tagger.tasks.items()
            if getattr(task, "class_names", None)
        }
        inputs = {
            INPUT_NAMES[t]: {"input_type": t, "dataset": self.input_map[t], "variables": v}
            for t, v in self.variables.items()
        }
        inputs[MASK_NAME] = {"input_type": "tracks", "meaning": "True for padded track slots"}
        return {
            "model_name": self.model_name,
            "salt_version": salt.__version__,
            "variables": json.dumps(self.variables),
            "inputs": json.dumps(inputs),
            "outputs": json.dumps(self.output_names),
            "norm_dict": json.dumps(self.norm),
            "class_names": json.dumps(class_names),
            "input_map": json.dumps({t: self.input_map[t] for t in self.input_types}),
            "checkpoint": str(checkpoint),
        }


def example_inputs(wrapper: ONNXTagger, batch: int = 3, tracks: int = 5) -> tuple[Tensor, ...]:
    """Placeholder inputs to trace the graph (one jet without tracks, one with all slots)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {
        INPUT_NAMES["jets"]: (batch, len(wrapper.variables.get("jets", []))),
        INPUT_NAMES["tracks"]: (batch, tracks, len(wrapper.variables["tracks"])),
        INPUT_NAMES["global"]: (batch, len(wrapper.variables.get("global", []))),
    }
    n_real = torch.arange(batch) * tracks // max(batch - 1, 1)
    mask = torch.arange(tracks)[None, :] >= n_real[:, None]
    return tuple(
        mask if name == MASK_NAME else torch.randn(shapes[name], generator=gen)
        for name in wrapper.input_names
    )


@contextlib.contextmanager
def padded_path(tagger: nn.Module) -> Iterator[None]:
    """Run the tagger on its padded path: the packed path sizes tensors by the number of real
    tracks of the batch at hand, which a traced graph would freeze to the example's count."""
    backend = getattr(tagger, "backend", None)
    if backend is None:
        yield
        return
    tagger.backend = "padded"
    try:
        yield
    finally:
        tagger.backend = backend


def export_bytes(wrapper: ONNXTagger, checkpoint: Path, opset: int = OPSET) -> bytes:
    """The serialised ONNX model with its metadata, checked by ``onnx.checker``."""
    onnx, _ = require_onnx()
    wrapper.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), padded_path(wrapper.tagger):
        # chosen on purpose (see the module docstring)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx.*")
        # the tagger's check of the feature count compares a traced shape with a constant:
        # harmless, the feature counts are fixed by the variable lists
        warnings.filterwarnings(
            "ignore", category=torch.jit.TracerWarning, module="salt.models.tagger"
        )
        try:
            torch.onnx.export(
                wrapper,
                example_inputs(wrapper),
                buffer,
                input_names=wrapper.input_names,
                output_names=wrapper.output_names,
                dynamic_axes=wrapper.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as err:  # the exporter raises many types; name the step
            raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err
    model = onnx.load_from_string(buffer.getvalue())
    for key, value in wrapper.metadata(checkpoint).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "salt"
    model.producer_version = salt.__version__
    onnx.checker.check_model(model)
    return model.SerializeToString()


def session(model_bytes: bytes) -> Any:
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def raw_features(
    file: h5py.File, dataset: str, variables: Sequence[str], rows: slice
) -> np.ndarray:
    """Unnormalised float32 features ``[rows, (slots,) n_vars]`` read with h5py."""
    data = file[dataset].fields(list(variables))[rows]
    return np.stack([data[v].astype(np.float32) for v in variables], axis=-1)


def _max_difference(reference: np.ndarray, value: np.ndarray) -> float:
    """Largest absolute difference; inf for a shape mismatch or a non-finite value."""
    if reference.shape != value.shape:
        return math.inf
    diff = np.abs(reference.astype(np.float64) - value.astype(np.float64))
    return float(diff.max(initial=0.0)) if np.isfinite(diff).all() else math.inf


@torch.no_grad()
def parity(
    wrapper: ONNXTagger,
    model_bytes: bytes,
    run: LoadedRun,
    file: Path,
    num_jets: int,
    batch_size: int,
) -> dict[str, float]:
    """Largest |onnxruntime - torch| per output over the first ``num_jets`` jets of ``file``.

    The torch side is the evaluation path: the training loader's normalisation and the tagger
    on the file's full track slots. The ONNX side gets the raw features read with h5py, cut to
    the batch's last real slot, so the dynamic ``tracks`` axis and the in-graph normalisation
    are both checked. Track outputs are compared on the slots the ONNX model saw.
    """
    sess = session(model_bytes)
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
    worst = dict.fromkeys(wrapper.output_names, 0.0)
    offset = 0
    with open_h5(file) as f:
        for batch in loader:
            masks = {k: v.to(run.device) for k, v in batch["pad_masks"].items()}
            inputs = {k: v.to(run.device) for k, v in batch["inputs"].items()}
            outputs, _ = run.tagger(inputs, masks)
            reference = wrapper.select(run.tagger.predict(outputs))
            rows = slice(offset, offset + len(masks["tracks"]))
            offset = rows.stop
            feed, width = _raw_batch(wrapper, f, rows)
            got = sess.run(wrapper.output_names, feed)
            for (name, task, _), ref, value in zip(wrapper.outputs, reference, got, strict=True):
                ref_np = _cut_slots(ref.float().cpu().numpy(), run.tagger.tasks[task], width)
                worst[name] = max(worst[name], _max_difference(ref_np, value))
    return worst


def _raw_batch(wrapper: ONNXTagger, f: h5py.File, rows: slice) -> tuple[dict[str, Any], int]:
    """The ONNX inputs for ``rows`` of ``f``, cut to the last real track slot of the batch."""
    valid = f[wrapper.input_map["tracks"]].fields(VALID)[rows].astype(bool)
    width = int(np.flatnonzero(valid.any(axis=0)).max(initial=0)) + 1
    feed: dict[str, Any] = {MASK_NAME: ~valid[:, :width]}
    for input_type in wrapper.input_types:
        dataset, names = wrapper.input_map[input_type], wrapper.variables[input_type]
        x = raw_features(f, dataset, names, rows)
        feed[INPUT_NAMES[input_type]] = x[:, :width] if input_type == "tracks" else x
    return feed, width


def _cut_slots(value: np.ndarray, task: nn.Module, width: int) -> np.ndarray:
    """A torch output on the file's full slots, cut to the slots the ONNX model saw."""
    if getattr(task, "input_type", None) != "tracks":
        return value
    if isinstance(task, VertexingTask):
        return value[:, :width, :width]
    return value[:, :width]
