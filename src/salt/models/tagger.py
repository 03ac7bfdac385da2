"""The tagger: init nets -> transformer encoder -> (global concat) -> pooling -> task heads.

`build_tagger` assembles it from the `model` config node; every layer size follows from the
variable lists and the chosen parts:

- one init net per object type (`tracks`, `flows`, `electrons`...: every input type but
  `jets` and `global`): its variables, with the jets variables appended to every object;
  with several types, a learned embedding of the type is added, and the objects of a jet form
  one sequence (types in the order of `model.variables`);
- encoder: `embed_dim` -> `encoder.out_dim`, with its register tokens appended to every
  jet's objects (the pooling sees them, the object tasks do not); with `edges`, the objects'
  pair features (from their raw kinematics) as a bias of its attention logits
  (`salt.models.edges`);
- track representations: encoder out_dim + len(global variables) (global appended after
  the encoder);
- pooled jet vector: the track representation size (global_attention) or the pooling's
  out_dim (cross_attention, default the encoder out_dim);
- jet tasks see the pooled vector; object tasks (`input: tracks`, `flows`...) the
  representations of their type's objects, with the pooled vector appended as context when
  `context: true`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from omegaconf import MISSING, DictConfig
from torch import Tensor, nn

from salt.data.labels import LabelSpec
from salt.errors import ModelConfigError
from salt.models.attention import (
    ATTENTION_BACKENDS,
    SelfAttentionConfig,
    resolve_heads,
    varlen_kernel,
)
from salt.models.dense import Dense, DenseConfig
from salt.models.edges import EdgeBias, EdgeConfig, EdgeInputs, InputNorm
from salt.models.multitask import LOSS_MODE_ALIASES, LOSS_MODES, total_loss
from salt.models.packing import Packing
from salt.models.pooling import (
    CrossAttentionPooling,
    GlobalAttentionPooling,
    PoolingConfig,
    PoolingType,
)
from salt.models.tasks import (
    ClassificationTask,
    RegressionTask,
    Task,
    TaskConfig,
    TaskType,
    VertexingTask,
)
from salt.models.transformer import EncoderConfig, TransformerEncoder
from salt.utils import typed_config
from salt.utils.input_types import object_types

ModelNode = DictConfig | Mapping[str, Any]  # a `model` node as composed or saved


@dataclass
class ModelConfig:
    """The `model` node (conf/model/*.yaml): what `build_tagger` builds. No input size is
    set here: every layer size follows from the variable lists."""

    name: str = MISSING
    variables: dict[str, list[str] | None] = MISSING  # input type -> variable names
    embed_dim: int = MISSING  # init net output and transformer width
    init_net: DenseConfig = field(default_factory=DenseConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    attention: SelfAttentionConfig = MISSING
    pooling: PoolingConfig = MISSING
    tasks: dict[str, TaskConfig] = MISSING
    loss_mode: str = "weighted_sum"  # weighted_sum | GLS (geometric mean; task weights 1)
    # pair features as an attention bias (features: []: none)
    edges: EdgeConfig = field(default_factory=EdgeConfig)

    @classmethod
    def read(cls, node: ModelConfig | ModelNode) -> ModelConfig:
        """`node` as a checked ModelConfig (one ModelConfigError naming the key if not)."""
        return typed_config.read(cls, node, "model")

    def check(self, where: str) -> None:
        typed_config.positive(self.embed_dim, f"{where}.embed_dim")
        self.init_net.check(f"{where}.init_net")
        self.encoder.check(f"{where}.encoder")
        self.attention.check(f"{where}.attention")
        self.pooling.check(f"{where}.pooling")
        for input_type, names in self.variables.items():
            if not str(input_type).isidentifier():
                raise ModelConfigError(
                    f"{where}.variables: {input_type!r} is not an input type name (jets, "
                    "global, or an object type such as tracks, flows, electrons)"
                )
            names = names or []
            doubled = sorted({n for n in names if names.count(n) > 1})
            if doubled:
                raise ModelConfigError(
                    f"{where}.variables.{input_type}: duplicated variable(s) {doubled}"
                )
        self.variables = {k: list(v) for k, v in self.variables.items() if v}  # type: ignore[misc]
        objects = object_types(self.variables)
        if not objects:
            raise ModelConfigError(
                f"{where}.variables must list the variables of at least one object type "
                "(tracks, flows, ...) besides jets and global"
            )
        self.edges.check(f"{where}.edges", self.variables)
        if self.edges.enabled and self.attention.backend == "varlen":
            raise ModelConfigError(
                f"{where}.attention.backend=varlen cannot add {where}.edges' bias to the "
                "attention logits (the flash varlen kernel takes none); use auto, packed or "
                f"padded, or {where}.edges.features=[]"
            )
        if not self.tasks:
            raise ModelConfigError(f"{where}.tasks must map task names to task settings")
        for name, task in self.tasks.items():
            if not name.isidentifier() or name == "loss":
                raise ModelConfigError(
                    f"{where}.tasks.{name}: task names must be identifiers and not 'loss' "
                    "(the total loss key)"
                )
            task.check(f"{where}.tasks.{name}")
            if task.input != "jets" and task.input not in objects:
                raise ModelConfigError(
                    f"{where}.tasks.{name}.input: {task.input!r} is not an input of the model; "
                    f"its object types are {objects} (and jets)"
                )
        self.loss_mode = LOSS_MODE_ALIASES.get(self.loss_mode.lower(), self.loss_mode)
        typed_config.one_of(self.loss_mode, f"{where}.loss_mode", LOSS_MODES)
        weighted = {n: t.weight for n, t in self.tasks.items() if t.weight != 1.0}
        if self.loss_mode == "GLS" and weighted:
            # as the old tool: under a geometric mean a weight only scales the whole loss
            keys = " ".join(f"{where}.tasks.{n}.weight=1" for n in weighted)
            raise ModelConfigError(
                f"{where}.loss_mode=GLS balances the tasks by their losses and takes no task "
                f"weights (as the old tool), but {weighted} are set; set {keys}"
            )

    def plain(self) -> dict[str, Any]:
        """As plain dicts and lists (the checkpoint's `config`)."""
        return typed_config.as_plain(self)


class Tagger(nn.Module):
    """A jet tagger; `forward` returns (outputs, losses) per task.

    `backend` (`model.attention.backend`, settable on a built tagger) picks how the same
    function is computed (`ATTENTION_BACKENDS`):

    - `packed`: every per-track part runs on the real tracks only (`salt.models.packing`),
      self-attention per block of jets with equal multiplicity: fastest on CPU;
    - `varlen`: the same packed rows, self-attention in one flash varlen call over all jets
      (CUDA, fp16/bf16; elsewhere an exact reference), no loop over multiplicities;
    - `padded`: every track slot, masked attention; no data-dependent shapes (no host sync,
      one graph for `torch.compile`); what tracing (ONNX export) records;
    - `auto`: packed on CPU; on CUDA varlen under fp16/bf16 autocast where torch has the
      kernel and the attention is scaled dot-product, else padded.

    With edge features (`edge_inputs`, the encoder's `edge_bias`), varlen is refused (its
    kernel adds no bias to the logits) and `auto` never chooses it.
    """

    def __init__(
        self,
        name: str,
        variables: Mapping[str, list[str]],
        init_nets: Mapping[str, Dense],
        encoder: TransformerEncoder,
        pooling: nn.Module,
        tasks: Mapping[str, Task],
        backend: str = "auto",
        loss_mode: str = "weighted_sum",
        edge_inputs: EdgeInputs | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        if (edge_inputs is None) != (encoder.edge_bias is None):
            raise ValueError("edge_inputs and the encoder's edge_bias go together")
        self.has_edges = edge_inputs is not None
        self._attention_type = encoder.attention_type
        self.backend = backend
        self.variables = {k: list(v) for k, v in variables.items()}
        self.object_types = object_types(self.variables)
        self.init_nets = nn.ModuleDict({t: init_nets[t] for t in self.object_types})
        # which type each object is: only needed to tell several types apart
        self.type_embedding = (
            nn.Parameter(torch.zeros(len(self.object_types), encoder.embed_dim))
            if len(self.object_types) > 1
            else None
        )
        self.encoder = encoder
        self.pooling = pooling
        self.tasks = nn.ModuleDict(tasks)
        self.edge_inputs = edge_inputs
        self._register_load_state_dict_pre_hook(_rename_single_init_net)
        self.loss_mode = loss_mode  # how the task losses make "loss" (salt.models.multitask)

    @property
    def backend(self) -> str:
        """How the encoder's self-attention is computed (`ATTENTION_BACKENDS`)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value, self._attention_type, self.has_edges)

    def _input(self, inputs: Mapping[str, Tensor], input_type: str) -> Tensor:
        """The batch input `input_type`, checked against its variable list."""
        names = self.variables[input_type]
        if input_type not in inputs:
            raise KeyError(
                f"model {self.name}: the batch has no input {input_type!r} (model.variables."
                f"{input_type} lists {len(names)} variables); it has {sorted(inputs)}"
            )
        x = inputs[input_type]
        if x.shape[-1] != len(names):
            raise ValueError(
                f"model {self.name}: input {input_type!r} has {x.shape[-1]} features but "
                f"model.variables.{input_type} lists {len(names)}: {names}"
            )
        return x

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        pad_masks: Mapping[str, Tensor],
        labels: Mapping[str, Mapping[str, Tensor]] | None = None,
        jets_per_size: Sequence[int] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Outputs per task and, with labels, the task losses plus "loss", their weighted sum
        or geometric mean (`loss_mode`).

        `inputs`: {"tracks": [B, T, Ft], "jets": [B, Fj], "global": [B, Fg]} (as configured);
        `pad_masks`: {"tracks": bool [B, T]}, True for padded slots. `jets_per_size`:
        `jets_per_multiplicity` of the tracks mask, counted on the host (spares the packed
        layouts their one host sync on a GPU).
        """
        objects = {t: self._input(inputs, t) for t in self.object_types}
        masks = {t: self._mask(pad_masks, t) for t in self.object_types}
        jets = self._input(inputs, "jets") if "jets" in self.variables else None
        glob = self._input(inputs, "global") if "global" in self.variables else None
        layout = self.layout(next(iter(objects.values())).device)
        if layout == "padded":
            outputs = self._forward_padded(objects, jets, glob, masks)
        else:
            counts = _counts_by_type(jets_per_size, self.object_types)
            outputs = self._forward_packed(objects, jets, glob, masks, counts, layout == "varlen")
        if labels is None:
            return outputs, {}
        first = masks[self.object_types[0]]
        losses = {
            name: task.loss(outputs[name], task.target(labels), masks.get(task.input_type, first))
            for name, task in self.tasks.items()
        }
        weights = {name: task.weight for name, task in self.tasks.items()}
        losses["loss"] = total_loss(losses, weights, self.loss_mode)
        return outputs, losses

    def _mask(self, pad_masks: Mapping[str, Tensor], input_type: str) -> Tensor:
        if input_type not in pad_masks:
            raise KeyError(
                f"model {self.name}: the batch has no pad mask for {input_type!r}; it has "
                f"{sorted(pad_masks)}"
            )
        return pad_masks[input_type]

    def _embed(self, k: int, input_type: str, x: Tensor, jets: Tensor | None, packing=None):
        """The init net of one object type (+ its type embedding)."""
        h = self.init_nets[input_type](x, jets, packing)
        if self.type_embedding is not None:
            h = h + self.type_embedding[k].to(h.dtype)
        return h

    def _forward_padded(
        self,
        objects: Mapping[str, Tensor],
        jets: Tensor | None,
        glob: Tensor | None,
        masks: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """The task outputs, computing on every object slot (the reference path)."""
        types = self.object_types
        parts = [self._embed(k, t, objects[t], jets) for k, t in enumerate(types)]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        pad_mask = masks[types[0]] if len(types) == 1 else torch.cat([masks[t] for t in types], 1)
        edges = self._edges(objects, jets)
        # x: the objects, then the encoder's registers (seen by the pooling, not the tasks)
        x, seq_mask = self.encoder(x, pad_mask, edges)
        if glob is not None:
            glob = glob.to(x.dtype)
            x = _concat_masked(x, glob[:, None, :].expand(-1, x.shape[1], -1), seq_mask)
        pooled = self.pooling(x, seq_mask)
        per_type, start = {}, 0
        for t in types:
            width = masks[t].shape[1]
            per_type[t] = x[:, start : start + width]
            start += width
        return {
            name: task(
                pooled,
                per_type.get(task.input_type, per_type[types[0]]),
                masks.get(task.input_type, masks[types[0]]),
            )
            for name, task in self.tasks.items()
        }

    def _edges(self, objects: Mapping[str, Tensor], jets: Tensor | None) -> Tensor | None:
        """The objects' edge inputs `[B, T, C]` in the encoder's order (None without edges)."""
        if self.edge_inputs is None:
            return None
        per_type = self.edge_inputs(objects, jets)
        parts = [per_type[t] for t in self.object_types]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def layout(self, device: torch.device) -> str:
        """The layout a forward on `device` runs now: padded, packed or varlen (`backend`)."""
        if torch.jit.is_tracing():
            return "padded"  # a traced graph (ONNX export) would freeze one batch's packing
        if self.backend != "auto":
            return self.backend
        if device.type != "cuda":
            return "packed"
        low_precision = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in (
            torch.float16,
            torch.bfloat16,
        )
        varlen = self.encoder.attention_type == "scaled_dot_product" and varlen_kernel()
        return "varlen" if low_precision and varlen and not self.has_edges else "padded"

    def compile_for(self, layout: str, backend: str = "inductor") -> None:
        """torch.compile with dynamic shapes: no recompile as batch size and track count vary.

        `padded`: the whole forward, one graph. The packed layouts build their structure from
        the batch's multiplicities in Python (a new graph per batch if traced), so only the
        per-track parts are compiled: the init net, every encoder feed-forward block and the
        task heads after their first layer. `backend`: torch.compile's (inductor; aot_eager
        and eager trace without generating code, for debugging).
        """
        if layout == "padded":
            self.compile(dynamic=True, backend=backend)
            return
        for init_net in self.init_nets.values():
            init_net.compile_tail(backend)
        for layer in self.encoder.layers:
            layer.compile_feed_forward(backend)
        for task in self.tasks.values():
            task.net.compile_tail(backend)

    def _forward_packed(
        self,
        objects: Mapping[str, Tensor],
        jets: Tensor | None,
        glob: Tensor | None,
        masks: Mapping[str, Tensor],
        counts: Mapping[str, Sequence[int]],
        varlen: bool,
    ) -> dict[str, Tensor]:
        """The same outputs, computing per-object parts on the real objects only.

        All objects of a jet form one packed sequence (`packing`); each type's rows in it are
        `rows[type]`, in the order of the type's own packing (`packings[type]`), which its
        init net and tasks use.
        """
        types = self.object_types
        packings = {t: Packing.from_mask(masks[t], counts.get(t)) for t in types}
        if len(types) == 1:
            packing, rows = packings[types[0]], None
        else:
            packing = Packing.from_mask(
                torch.cat([masks[t] for t in types], dim=1), counts.get(ALL_OBJECTS)
            )
            rows = _rows_by_type(packing, packings, masks, types)
        if packing.num_tracks == 0:
            # nothing to pack; the padded path keeps every parameter in the autograd graph
            # (zero gradients, not None), as the same function must
            return self._forward_padded(objects, jets, glob, masks)
        x: Tensor | None = None
        unused: list[Tensor] = []
        for k, t in enumerate(types):
            if packings[t].num_tracks == 0:
                # no object of this type in the batch: its init net still joins the graph
                # (zero gradients, not None), as on the padded path and as DDP needs
                first_jet = jets[:1] if jets is not None else None
                unused.append(self._embed(k, t, objects[t][:1], first_jet).sum() * 0.0)
                continue
            h = self._embed(k, t, packings[t].pack(objects[t]), jets, packings[t])
            if rows is None:
                x = h
            else:
                x = h.new_zeros(packing.num_tracks, h.shape[-1]) if x is None else x
                x = x.index_copy(0, rows[t], h)
        assert x is not None
        if unused:
            x = x + sum(unused)  # adds zero
        edges = self._edges(objects, jets)  # a few columns: packed from the padded layout
        if edges is not None:
            edges = packing.pack(edges)
        # seq: objects and registers
        x, seq = self.encoder.forward_packed(x, packing, varlen, edges)
        if glob is not None:
            x = torch.cat([x, seq.per_track(glob.to(x.dtype))], dim=-1)
        pooled = self.pooling.forward_packed(x, seq)
        x = seq.tracks(x)
        outputs = {}
        for name, task in self.tasks.items():
            t = task.input_type if task.input_type in packings else types[0]
            if rows is None:
                outputs[name] = task.forward_packed(pooled, x, packings[t])
            elif packings[t].num_tracks == 0:  # no object of the type: all padded
                outputs[name] = task(pooled, x.new_zeros(*masks[t].shape, x.shape[-1]), masks[t])
            else:
                outputs[name] = task.forward_packed(pooled, x.index_select(0, rows[t]), packings[t])
        return outputs

    def flavour_task(self) -> ClassificationTask | None:
        """The jet flavour task: ``jet_classification`` if present, else the first jet
        classification task (None without one)."""
        candidates = [
            t
            for t in self.tasks.values()
            if isinstance(t, ClassificationTask) and t.input_type == "jets"
        ]
        for task in candidates:
            if task.name == "jet_classification":
                return task
        return candidates[0] if candidates else None

    def predict(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Probabilities (classification: softmax, vertexing: sigmoid) or regression values.

        Values on padded tracks (pairs) carry no meaning; select real ones with the pad mask.
        """
        return {name: task.predict(outputs[name]) for name, task in self.tasks.items()}


def check_backend(backend: str, attention_type: str, edges: bool = False) -> str:
    """`backend` if it is one of ATTENTION_BACKENDS and fits the attention type and edges."""
    if backend not in ATTENTION_BACKENDS:
        raise ModelConfigError(
            f"model.attention.backend={backend!r}: expected one of "
            f"{', '.join(map(str, ATTENTION_BACKENDS))}"
        )
    if backend == "varlen" and attention_type != "scaled_dot_product":
        raise ModelConfigError(
            f"model.attention.backend=varlen needs scaled_dot_product attention (the flash "
            f"kernel computes no {attention_type} scores); use auto, packed or padded"
        )
    if backend == "varlen" and edges:
        raise ModelConfigError(
            "model.attention.backend=varlen cannot add model.edges' bias to the attention "
            "logits (the flash varlen kernel takes none); use auto, packed or padded"
        )
    return str(backend)


ALL_OBJECTS = "objects"  # the key of the combined sequence's counts (see `_counts_by_type`)


def _counts_by_type(
    jets_per_size: Mapping[str, Sequence[int]] | Sequence[int] | None, types: Sequence[str]
) -> dict[str, Sequence[int]]:
    """`jets_per_multiplicity` by object type (and `ALL_OBJECTS` for their sequence), as the
    loop counted them on the host; a plain list is the single object type's."""
    if jets_per_size is None:
        return {}
    if isinstance(jets_per_size, Mapping):
        return dict(jets_per_size)
    return {types[0]: jets_per_size} if len(types) == 1 else {}


def _rows_by_type(
    packing: Packing,
    packings: Mapping[str, Packing],
    masks: Mapping[str, Tensor],
    types: Sequence[str],
) -> dict[str, Tensor]:
    """For each type, the rows of the joint `packing` that hold its objects, in the order of
    the type's own packing."""
    batch, width = packing.pad_mask.shape
    row_of_slot = torch.zeros(batch * width, dtype=torch.long, device=packing.slot.device)
    row_of_slot.index_copy_(
        0, packing.slot, torch.arange(packing.num_tracks, device=packing.slot.device)
    )
    rows, start = {}, 0
    for t in types:
        slots = masks[t].shape[1]
        own = packings[t].slot
        jet = torch.div(own, slots, rounding_mode="floor")
        rows[t] = row_of_slot.index_select(0, jet * width + start + own % slots)
        start += slots
    return rows


def _rename_single_init_net(state: dict, prefix: str, *args: Any) -> None:
    """Checkpoints from before several object types named the one init net `init_net`."""
    old = f"{prefix}init_net."
    for key in [k for k in state if k.startswith(old)]:
        state[f"{prefix}init_nets.tracks.{key[len(old) :]}"] = state.pop(key)


def _concat_masked(x: Tensor, extra: Tensor, pad_mask: Tensor) -> Tensor:
    """Concatenate `extra` to `x` along features; padded slots stay zero."""
    return torch.cat([x, extra], dim=-1).masked_fill(pad_mask.unsqueeze(-1), 0.0)


def input_variables(model_cfg: ModelConfig | ModelNode) -> dict[str, list[str]]:
    """The input variable lists by input type (jets, global, tracks, flows...), for the
    loader."""
    return {k: list(v) for k, v in ModelConfig.read(model_cfg).variables.items()}


def label_specs(model_cfg: ModelConfig | ModelNode) -> dict[str, dict[str, LabelSpec]]:
    """`{input_type: {label: LabelSpec}}` of all tasks, for the loader to read the labels.

    Classification labels carry their class count (`len(class_names)`), so the loader refuses
    values the task has no class for; vertexing labels (and a vertexing task's origin_label,
    unless a classification task reads it) are read as integers (`LabelSpec()`),
    regression targets and their denominators as float32 (`LabelSpec(continuous=True)`), a
    task's sample_weight (a jet variable) as float32 checked to be finite and >= 0; the
    denominators and weights are no truth (`truth=False`): they may be model inputs. Two tasks
    reading the same label with different label maps, or one as numbers and one as classes, is
    a config error; two classification tasks sharing an unmapped label get the smaller class
    count.
    """
    specs: dict[str, dict[str, LabelSpec]] = {}
    owner: dict[tuple[str, str], str] = {}
    for name, input_type, label, spec in _label_reads(ModelConfig.read(model_cfg)):
        key = (input_type, label)
        if key in owner:
            seen = specs[key[0]][key[1]]
            if seen.continuous != spec.continuous:
                as_number = owner[key] if seen.continuous else name
                as_class = name if seen.continuous else owner[key]
                raise ModelConfigError(
                    f"model.tasks.{as_number} reads {key[1]!r} of {key[0]} as numbers and "
                    f"model.tasks.{as_class} as integer labels; use another variable for one"
                )
            if seen.label_map != spec.label_map:
                raise ModelConfigError(
                    f"model.tasks.{owner[key]} and model.tasks.{name} read label {key[1]!r} of "
                    f"{key[0]} with different label_map ({seen.label_map} vs {spec.label_map})"
                )
            if spec.continuous:  # checked as a weight, and truth, if either read says so
                specs[key[0]][key[1]] = replace(
                    seen,
                    task=seen.task or spec.task,
                    weight=seen.weight or spec.weight,
                    truth=seen.truth or spec.truth,
                )
                continue
            classes = spec.num_classes
            if classes is None or (seen.num_classes is not None and seen.num_classes <= classes):
                continue  # the stricter spec already read wins: both tasks get valid values
        owner.setdefault(key, name)
        specs.setdefault(key[0], {})[key[1]] = spec
    return specs


def _label_reads(cfg: ModelConfig) -> list[tuple[str, str, str, LabelSpec]]:
    """(task, input type, variable, how it is read) of every label the tasks read."""
    reads = []
    for name, task in cfg.tasks.items():
        kind = task.type
        if kind == TaskType.regression:
            for target in task.target_names():
                reads.append((name, task.input, target, LabelSpec(continuous=True)))
            for denominator in task.target_denominators or []:  # not truth: may be an input
                spec = LabelSpec(continuous=True, truth=False)
                reads.append((name, task.input, denominator, spec))
        else:
            classes = len(task.class_names or []) if kind == TaskType.classification else None
            mapping = dict(task.label_map) if task.label_map is not None else None
            spec = LabelSpec(mapping, classes, name if classes is not None else None)
            reads.append((name, task.input, str(task.label), spec))
        if kind == TaskType.vertexing and task.origin_label:  # pair weights, unmapped
            reads.append((name, task.input, task.origin_label, LabelSpec()))
        if task.sample_weight:
            weight = LabelSpec(task=name, continuous=True, weight=True, truth=False)
            reads.append((name, "jets", task.sample_weight, weight))
    return reads


def _encoder(cfg: ModelConfig) -> TransformerEncoder:
    enc, att = cfg.encoder, cfg.attention
    num_heads, _ = resolve_heads(cfg.embed_dim, att.num_heads, att.head_dim, "model.attention")
    return TransformerEncoder(
        embed_dim=cfg.embed_dim,
        num_layers=enc.num_layers,
        num_heads=num_heads,
        out_dim=enc.out_dim,
        attention=str(att.type),
        attention_dropout=att.dropout,
        negative_slope=att.negative_slope,
        ff_hidden_scale=enc.ff_hidden_scale,
        activation=enc.activation,
        dropout=enc.dropout,
        num_registers=enc.num_registers,
        norm_affine=enc.norm_affine,
        norm=str(enc.norm),
        norm_type=str(enc.norm_type),
        gated=enc.gated,
    )


def _pooling(pool: PoolingConfig, input_size: int, encoder_out: int) -> nn.Module:
    if pool.type == PoolingType.global_attention:
        return GlobalAttentionPooling(input_size)
    att = pool.attention
    assert att is not None  # PoolingConfig.check
    out_dim = pool.out_dim or encoder_out
    num_heads, _ = resolve_heads(out_dim, att.num_heads, att.head_dim, "model.pooling.attention")
    return CrossAttentionPooling(
        input_size=input_size,
        output_size=out_dim,
        num_layers=pool.num_layers,
        num_heads=num_heads,
        attention=str(att.type),
        attention_dropout=att.dropout,
        negative_slope=att.negative_slope,
        **pool.dense.layers(),
    )


def _class_weights(
    name: str, spec: TaskConfig, class_dict: Mapping[str, Any] | None
) -> list[float] | None:
    if not spec.use_class_weights:
        return None
    where = f"model.tasks.{name}.use_class_weights"
    input_type, label = spec.input, spec.label
    if class_dict is None:
        raise ModelConfigError(
            f"{where} is true but no class_dict was given; set data.class_dict (by default "
            f"class_dict.yaml beside the training file, as FTAG preprocessing writes it), or "
            f"{where}=false"
        )
    try:
        weights = class_dict[input_type][label]
    except (KeyError, TypeError):
        raise ModelConfigError(
            f"{where}: the class_dict has no weights for input {input_type!r}, label {label!r}"
        ) from None
    expected = len(spec.class_names or [])
    if not isinstance(weights, list | tuple) or len(weights) != expected:
        found = len(weights) if isinstance(weights, list | tuple) else repr(weights)
        raise ModelConfigError(
            f"{where}: class_dict[{input_type!r}][{label!r}] must hold {expected} weights "
            f"(one per class in {spec.class_names}), found {found}"
        )
    return [float(w) for w in weights]


def _task(
    name: str,
    spec: TaskConfig,
    track_size: int,
    pooled_size: int,
    class_dict: Mapping[str, Any] | None,
    loss_weights: bool,
) -> Task:
    dense = spec.dense().layers()
    context_size = pooled_size if spec.context else 0
    if spec.type == TaskType.classification:
        on_jets = spec.input == "jets"
        return ClassificationTask(
            name=name,
            input_type=spec.input,
            label=str(spec.label),
            class_names=list(spec.class_names or []),
            input_size=pooled_size if on_jets else track_size,
            context_size=context_size,
            weight=spec.weight,
            label_map=dict(spec.label_map) if spec.label_map is not None else None,
            class_weights=_class_weights(name, spec, class_dict) if loss_weights else None,
            sample_weight=spec.sample_weight,
            **dense,
        )
    if spec.type == TaskType.vertexing:
        return VertexingTask(
            name=name,
            label=str(spec.label),
            input_size=track_size,
            context_size=context_size,
            weight=spec.weight,
            origin_label=spec.origin_label,
            reduction=str(spec.reduction),
            input_type=spec.input,
            **dense,
        )
    return RegressionTask(
        name=name,
        targets=spec.target_names(),
        input_size=pooled_size if spec.input == "jets" else track_size,
        context_size=context_size,
        input_type=spec.input,
        loss=str(spec.loss),
        huber_delta=float(spec.huber_delta or 1.0),
        weight=spec.weight,
        denominators=spec.target_denominators,
        scaling=spec.scaling,
        sample_weight=spec.sample_weight,
        **dense,
    )


def build_tagger(
    model_cfg: ModelConfig | ModelNode,
    class_dict: Mapping[str, Any] | None = None,
    backend: str | None = None,
    loss_weights: bool = True,
    input_norm: InputNorm | None = None,
) -> Tagger:
    """Build the tagger described by the `model` config node.

    `class_dict` ({input: {label: [weight per class]}}) supplies the class weights of tasks
    with `use_class_weights: true`; `loss_weights=False` builds for inference only (class
    weights only enter the training loss), without a class_dict. `backend` overrides
    `model.attention.backend` (see `Tagger`). `input_norm` (`salt.data.ftag.input_norm` of the
    norm_dict and data.input_map): what the loader normalises the inputs with, for `model.edges`
    to un-normalise the kinematics; a tagger with edges built without it does not run (its
    weights are of use: see `EdgeInputs`).
    """
    cfg = ModelConfig.read(model_cfg)
    for name, spec in cfg.tasks.items():
        if spec.type == TaskType.classification and not spec.class_names:
            raise ModelConfigError(
                f"model.tasks.{name}.class_names: not set (training takes them from the "
                "training file's attributes); list the classes"
            )
    label_specs(cfg)  # the label_map consistency check
    variables = {k: list(v) for k, v in cfg.variables.items()}
    init_nets = {
        t: Dense(
            len(variables[t]),
            cfg.embed_dim,
            context_size=len(variables.get("jets", [])),
            **cfg.init_net.layers(),
        )
        for t in object_types(variables)
    }
    encoder = _encoder(cfg)
    track_size = encoder.out_dim + len(variables.get("global", []))
    pooling = _pooling(cfg.pooling, track_size, encoder.out_dim)
    tasks = {
        name: _task(name, spec, track_size, pooling.output_size, class_dict, loss_weights)
        for name, spec in cfg.tasks.items()
    }
    backend = backend or str(cfg.attention.backend)
    edge_inputs = None
    if cfg.edges.enabled:
        # built last: every other weight is drawn as without edges (same seed, same weights)
        edges = cfg.edges
        heads = encoder.layers[0].attn.num_heads
        encoder.edge_bias = EdgeBias(edges.features, heads, edges.every_layer, **edges.layers())
        edge_inputs = EdgeInputs(variables, edges, input_norm)
    return Tagger(
        cfg.name,
        variables,
        init_nets,
        encoder,
        pooling,
        tasks,
        backend,
        cfg.loss_mode,
        edge_inputs,
    )
