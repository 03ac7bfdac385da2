"""The tagger as ATLAS's inference runs it: one jet, raw inputs, named outputs
(`salt.onnx.interface`), and its export to ONNX.

The graph applies the run's norm_dict (``(x - mean) / std``) in front of the tagger, as the
training loader does, so Athena feeds raw values (the metadata's offsets are 0 and scales 1, as
the old tool's). One padded slot is appended to every object sequence: a jet without tracks is
then the batched path's all-padded jet, and no tensor of the graph is empty.

The exporter is torch's TorchScript-based one (``dynamo=False``), as the old tool's: it needs
only ``onnx`` and ``onnxruntime`` and writes opset 20.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import salt
from salt.data.ftag import DEFAULT_INPUT_MAP, dataset_of, norm_arrays
from salt.errors import ConfigError, ExportError
from salt.evaluation.run import LoadedRun
from salt.models.tasks import (
    ClassificationTask,
    RegressionTask,
    VertexingTask,
    regression_output_names,
)
from salt.models.vertices import ONNX_ROUNDS, vertex_groups
from salt.onnx import interface as names
from salt.onnx.interface import Combination
from salt.utils.flavours import probability_name
from salt.utils.input_types import JET_INPUTS

OPSET = 20
INSTALL_HINT = "ONNX export needs the onnx and onnxruntime packages: pip install onnx onnxruntime"
EXAMPLE_TRACKS = 40  # the old tool traces with 40 tracks too


def require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or one clear error saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"{INSTALL_HINT} ({err})") from None
    return onnx, onnxruntime


def jet_input_variables(variables: Mapping[str, Sequence[str]]) -> list[str]:
    """The columns of ``jet_features``: the jet variables, then the global ones not among them
    (GN2Cat's global inputs come from the jet, as in the old tool)."""
    columns = list(variables.get("jets", []))
    columns += [v for v in variables.get("global", []) if v not in columns]
    return columns


class OnnxTagger(nn.Module):
    """A loaded run's tagger with the normalisation in front and Athena's outputs behind.

    ``tasks``: the tasks to export (default: the jet-level ones, as the old tool's default);
    ``combine``/``rename``: extra outputs as weighted sums, renamed outputs (names without the
    model prefix).
    """

    def __init__(
        self,
        run: LoadedRun,
        name: str | None = None,
        tasks: Sequence[str] | None = None,
        track_selection: str = names.DEFAULT_TRACK_SELECTION,
        combine: Sequence[Combination] = (),
        rename: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.tagger = run.tagger
        self.model_name = names.check_model_name(
            name or names.default_model_name(run.name), "name" if name else "the model's name"
        )
        self.variables = {k: list(v) for k, v in run.variables.items() if v}
        input_map = {**DEFAULT_INPUT_MAP, **dict(run.cfg.data.input_map or {})}
        if "global" in self.variables and input_map["global"] != input_map["jets"]:
            raise ExportError(
                f"model {run.name}: its global inputs come from dataset "
                f"{input_map['global']!r}, not the jets'; Athena's interface feeds only the jet "
                "and its object sequences."
            )
        self.features = names.feature_map(run.tagger.object_types, track_selection)
        self.jet_columns = jet_input_variables(self.variables)
        self.norm: dict[str, dict[str, dict[str, float]]] = {}
        for input_type, vars_ in self.variables.items():
            mean, inv_std = norm_arrays(
                run.norm_dict, input_type, dataset_of(input_map, input_type), vars_, "norm_dict"
            )
            self.register_buffer(f"mean_{input_type}", torch.from_numpy(mean))
            self.register_buffer(f"inv_std_{input_type}", torch.from_numpy(inv_std))
            # the metadata carries the norm_dict's own numbers (the graph holds float32 copies)
            key = input_type if input_type in run.norm_dict else dataset_of(input_map, input_type)
            section = run.norm_dict[key]
            self.norm[input_type] = {
                v: {"mean": float(section[v]["mean"]), "std": float(section[v]["std"])}
                for v in vars_
            }
        for input_type in JET_INPUTS:
            if input_type in self.variables:
                cols = [self.jet_columns.index(v) for v in self.variables[input_type]]
                self.register_buffer(f"columns_{input_type}", torch.tensor(cols))
        self.tasks = self._tasks(tasks)
        self.jet_outputs = self._jet_outputs()
        for task_name in {t for _, t, _ in self.jet_outputs}:
            task = self.tagger.tasks[task_name]
            if isinstance(task, RegressionTask) and task.denominators is not None:
                cols = [self._denominator_column(task, d) for d in task.denominators]
                self.register_buffer(f"denominators_{task_name}", torch.tensor(cols))
        known = [n for n, _, _ in self.jet_outputs]
        self.rename = dict(rename or {})
        for old in self.rename:
            if old not in known:
                raise ConfigError(
                    f"rename_outputs: no output {old!r} to rename; the jet outputs are {known}"
                )
        self.combine = list(combine)
        for combination in self.combine:
            for _, term in combination.terms:
                if term not in known:
                    raise ConfigError(
                        f"combine_outputs: {combination.name!r} sums {term!r}, not an output; "
                        f"the jet outputs are {known}"
                    )

    def _tasks(self, tasks: Sequence[str] | None) -> list[str]:
        available = list(self.tagger.tasks)
        if not tasks:
            return [n for n, t in self.tagger.tasks.items() if t.input_type == "jets"]
        for task in tasks:
            if task not in available:
                raise ConfigError(f"tasks: the model has no task {task!r}; it has {available}")
        # jet outputs first, per-track outputs after them, as Athena's loader lists them
        return sorted(tasks, key=lambda n: self.tagger.tasks[n].input_type != "jets")

    def _denominator_column(self, task: RegressionTask, variable: str) -> int:
        """The column of ``jet_features`` holding a regression target's denominator: the graph
        multiplies by the raw jet variable, as the predictions file does."""
        if variable not in self.jet_columns:
            raise ExportError(
                f"task {task.name}: its target denominator {variable!r} is not a jet input of "
                f"the model (jet_features: {self.jet_columns}), so the graph cannot give the "
                f"regression in physical units; add it to model.variables.jets and train "
                f"again, or export without that task (tasks=[...])"
            )
        return self.jet_columns.index(variable)

    def _jet_outputs(self) -> list[tuple[str, str, int | None]]:
        """(name without the model prefix, task, column) of each jet-level output."""
        flavour = self.tagger.flavour_task()
        regression = regression_output_names(
            [self.tagger.tasks[n] for n in self.tasks if self.tagger.tasks[n].input_type == "jets"]
        )
        outputs: list[tuple[str, str, int | None]] = []
        for task_name in self.tasks:
            task = self.tagger.tasks[task_name]
            if task.input_type != "jets":
                continue
            if isinstance(task, ClassificationTask):
                prefix = "" if task is flavour else f"{task_name}_"
                for i, cls in enumerate(task.class_names or []):
                    outputs.append((prefix + probability_name(cls), task_name, i))
            elif isinstance(task, RegressionTask):  # the targets, then their widths
                outputs += [(n, task_name, i) for i, n in enumerate(regression[task_name])]
            else:
                raise ExportError(f"task {task_name}: no ONNX output for {type(task).__name__}")
        return outputs

    @property
    def track_outputs(self) -> list[tuple[str, str]]:
        """(name without the model prefix, task) of each per-track output."""
        outputs = []
        for task_name in self.tasks:
            task = self.tagger.tasks[task_name]
            if task.input_type == "jets":
                continue
            if isinstance(task, VertexingTask):
                outputs.append((names.VERTEX_OUTPUT, task_name))
            elif isinstance(task, ClassificationTask):
                outputs.append((names.track_output(task_name), task_name))
            elif isinstance(task, RegressionTask):
                raise ExportError(
                    f"task {task_name}: a regression on {task.input_type} has no ONNX output "
                    "(Athena decorates objects with class and vertex indices only); export "
                    "without it (tasks=[...])"
                )
            else:
                raise ExportError(f"task {task_name}: no ONNX output for {type(task).__name__}")
        return outputs

    @property
    def input_names(self) -> list[str]:
        return [f.onnx for f in self.features]

    @property
    def output_names(self) -> list[str]:
        jet = [self.rename.get(n, n) for n, _, _ in self.jet_outputs]
        jet += [c.name for c in self.combine]
        tracks = [n for n, _ in self.track_outputs]
        return [f"{self.model_name}_{n}" for n in jet + tracks]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {f.onnx: {0: f.axis} for f in self.features if f.axis}
        object_axis = {f.salt: f.axis for f in self.features if f.axis}
        for name, task in self.track_outputs:  # one value per object of the task's type
            axes[f"{self.model_name}_{name}"] = {0: object_axis[self.tagger.tasks[task].input_type]}
        return axes

    def _normalised(self, x: Tensor, input_type: str) -> Tensor:
        return (x - getattr(self, f"mean_{input_type}")) * getattr(self, f"inv_std_{input_type}")

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        named = dict(zip(self.input_names, args, strict=True))
        jet = named["jet_features"].float()
        inputs: dict[str, Tensor] = {}
        for input_type in JET_INPUTS:
            if input_type in self.variables:
                cols = getattr(self, f"columns_{input_type}")
                inputs[input_type] = self._normalised(jet.index_select(1, cols), input_type)
        masks: dict[str, Tensor] = {}
        counts: dict[str, int] = {}  # traced: the dynamic object axis
        for feature in self.features[1:]:
            x = self._normalised(named[feature.onnx].float(), feature.salt)
            # one padded slot (zeros, as the loader pads): see the module docstring
            x = torch.cat([x, x.new_zeros(1, x.shape[1])])
            padded = torch.zeros_like(x[:, 0], dtype=torch.bool)
            padded = torch.cat([padded[:-1], padded.new_ones(1)])
            inputs[feature.salt], masks[feature.salt] = x[None], padded[None]
            counts[feature.salt] = named[feature.onnx].shape[0]
        outputs, _ = self.tagger(inputs, masks)
        values = self.named_outputs(outputs, masks, jet, rounds=ONNX_ROUNDS)
        per_object = dict(self.track_outputs)
        result = []
        for name, value in values.items():
            if name in per_object:  # the jet's real objects, without the padded slot
                n = counts[self.tagger.tasks[per_object[name]].input_type]
                result.append(value[0, :n].to(torch.int8))
            else:
                result.append(value[0])
        return tuple(result)

    def named_outputs(
        self,
        outputs: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        raw_jets: Tensor,
        rounds: int | None = None,
    ) -> dict[str, Tensor]:
        """Every output of the graph from the tagger's batched ``outputs``, by name without
        the model prefix and in the graph's order: jet values ``[B]`` (renamed, then the
        combinations), per-object classes and vertex groups ``[B, T]``. ``rounds``: see
        `vertex_groups` (the graph's constant)."""
        probs = self.tagger.predict(outputs)
        jet = self.jet_values(outputs, probs, raw_jets)
        result = {self.rename.get(n, n): v for n, v in jet.items()}
        for combination in self.combine:
            result[combination.name] = sum(s * jet[t] for s, t in combination.terms)
        for name, task_name in self.track_outputs:
            mask = masks[self.tagger.tasks[task_name].input_type]
            if name == names.VERTEX_OUTPUT:
                result[name] = vertex_groups(probs[task_name], mask, rounds=rounds)
            else:
                result[name] = probs[task_name].argmax(dim=-1)
        return result

    def jet_values(
        self, outputs: Mapping[str, Tensor], probs: Mapping[str, Tensor], raw_jets: Tensor
    ) -> dict[str, Tensor]:
        """Each jet output ``[B]`` by name (without the model prefix): class probabilities, and
        regression values in the targets' units, their denominators taken from the raw jet
        features ``raw_jets[B, len(jet_columns)]``."""
        regression: dict[str, Tensor] = {}
        values = {}
        for name, task_name, col in self.jet_outputs:
            task = self.tagger.tasks[task_name]
            if isinstance(task, RegressionTask):
                if task_name not in regression:
                    denominators = None
                    if task.denominators is not None:
                        cols = getattr(self, f"denominators_{task_name}")
                        denominators = raw_jets.float().index_select(1, cols)
                    regression[task_name] = task.predict(outputs[task_name], denominators)
                value = regression[task_name]
            else:
                value = probs[task_name]
            values[name] = value[:, col] if col is not None else value
        return values

    def example_inputs(self, tracks: int = EXAMPLE_TRACKS) -> tuple[Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        shapes = [(1, len(self.jet_columns))]
        shapes += [(tracks, len(self.variables[f.salt])) for f in self.features[1:]]
        return tuple(torch.randn(shape, generator=gen) for shape in shapes)

    def gnn_config(
        self, run: LoadedRun, commit: str | None, dirty: bool, extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The ``gnn_config`` metadata of the old tool (what Athena reads: ``inputs``,
        ``input_sequences``, ``output_names``), with salt's additions."""

        def entries(variables: Sequence[str], strip: str = "") -> list[dict[str, Any]]:
            # offset 0, scale 1: the graph normalises (see the module docstring)
            return [{"name": v.removesuffix(strip), "offset": 0.0, "scale": 1.0} for v in variables]

        jet, *sequences = self.features
        config: dict[str, Any] = {
            "ckpt_path": str(run.ckpt_path.resolve()),
            "layers": [],
            "nodes": [],
            "onnx_model_version": names.ONNX_MODEL_VERSION,
            "model_name": self.model_name,
            "output_names": self.output_names,
            "inputs": [
                {"name": jet.athena_in, "variables": entries(self.jet_columns, names.JET_SUFFIX)}
            ],
            "input_sequences": [
                {"name": f.athena_in, "variables": entries(self.variables[f.salt])}
                for f in sequences
            ],
            "combine_outputs": [c.plain() for c in self.combine],
            "rename_outputs": self.rename,
            "salt_export_hash": commit,
            "forced_export": dirty,  # exported from a salt checkout with uncommitted changes
            "salt_version": salt.__version__,
            # salt's: the normalisation the graph applies, and each graph input's variables
            "normalisation": {"applied_in_graph": True, **self.norm},
            "onnx_inputs": {
                f.onnx: self.jet_columns if f is jet else self.variables[f.salt]
                for f in self.features
            },
        }
        config.update(extra)
        return config


def export_bytes(wrapper: OnnxTagger, metadata: Mapping[str, Any], opset: int = OPSET) -> bytes:
    """The serialised ONNX model with its ``gnn_config``, checked by ``onnx.checker``."""
    onnx, _ = require_onnx()
    wrapper.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # chosen on purpose (see the module docstring)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx.*")
        # shape checks against the variable counts: constants of the graph, as they should be
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                wrapper,
                wrapper.example_inputs(),
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
    entry = model.metadata_props.add()
    entry.key, entry.value = "gnn_config", json.dumps(metadata)
    model.doc_string = wrapper.model_name
    model.producer_name = "salt"
    model.producer_version = salt.__version__
    onnx.checker.check_model(model)
    return model.SerializeToString()


def read_gnn_config(model_bytes: bytes, source: str | Path) -> dict[str, Any]:
    """The ``gnn_config`` of a serialised model; one clear error when it has none."""
    onnx, _ = require_onnx()
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as err:  # protobuf's DecodeError and others
        raise ExportError(f"{source}: not an ONNX model ({type(err).__name__}: {err})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "gnn_config" not in props:
        raise ExportError(
            f"{source}: no gnn_config metadata (keys: {sorted(props)}); not exported by "
            "salt.export or the old tool's to_onnx"
        )
    return json.loads(props["gnn_config"])


# onnx's TensorProto element types by number, for the schema (the ones a tagger uses)
_ELEM_TYPES = {1: "float32", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16"}


def graph_schema(model_bytes: bytes) -> dict[str, dict[str, dict[str, Any]]]:
    """The graph's inputs and outputs: ``{"inputs": {name: {"dtype", "shape"}}, "outputs":
    ...}``, a dynamic axis as its name (``n_tracks``), a fixed one as its size."""
    onnx, _ = require_onnx()
    graph = onnx.load_from_string(model_bytes).graph

    def describe(values: Any) -> dict[str, dict[str, Any]]:
        out = {}
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            dtype = _ELEM_TYPES.get(tensor.elem_type, str(tensor.elem_type))
            out[value.name] = {"dtype": dtype, "shape": shape}
        return out

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}
