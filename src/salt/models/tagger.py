"""The tagger: init net -> transformer encoder -> (global concat) -> pooling -> task heads.

`build_tagger` assembles it from the `model` config node; every layer size follows from the
variable lists and the chosen parts:

- init net input: tracks variables, with the jets variables appended to every track;
- encoder: `embed_dim` -> `encoder.out_dim`, with its register tokens appended to every
  jet's tracks (the pooling sees them, the track tasks do not);
- track representations: encoder out_dim + len(global variables) (global appended after
  the encoder);
- pooled jet vector: the track representation size (global_attention) or the pooling's
  out_dim (cross_attention, default the encoder out_dim);
- jet tasks see the pooled vector; track tasks the track representations, with the pooled
  vector appended as context when `context: true`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

INPUT_TYPES = ("jets", "tracks", "global")
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
            if input_type not in INPUT_TYPES:
                raise ModelConfigError(
                    f"{where}.variables: unknown input type {input_type!r}; allowed are "
                    f"{list(INPUT_TYPES)}"
                )
            names = names or []
            doubled = sorted({n for n in names if names.count(n) > 1})
            if doubled:
                raise ModelConfigError(
                    f"{where}.variables.{input_type}: duplicated variable(s) {doubled}"
                )
        self.variables = {k: list(v) for k, v in self.variables.items() if v}  # type: ignore[misc]
        if "tracks" not in self.variables:
            raise ModelConfigError(f"{where}.variables.tracks must list at least one variable")
        if not self.tasks:
            raise ModelConfigError(f"{where}.tasks must map task names to task settings")
        for name, task in self.tasks.items():
            if not name.isidentifier() or name == "loss":
                raise ModelConfigError(
                    f"{where}.tasks.{name}: task names must be identifiers and not 'loss' "
                    "(the total loss key)"
                )
            task.check(f"{where}.tasks.{name}")
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
    """

    def __init__(
        self,
        name: str,
        variables: Mapping[str, list[str]],
        init_net: Dense,
        encoder: TransformerEncoder,
        pooling: nn.Module,
        tasks: Mapping[str, Task],
        backend: str = "auto",
        loss_mode: str = "weighted_sum",
    ) -> None:
        super().__init__()
        self.name = name
        self.backend = check_backend(backend, encoder.attention_type)
        self.variables = {k: list(v) for k, v in variables.items()}
        self.init_net = init_net
        self.encoder = encoder
        self.pooling = pooling
        self.tasks = nn.ModuleDict(tasks)
        self.loss_mode = loss_mode  # how the task losses make "loss" (salt.models.multitask)

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
        tracks = self._input(inputs, "tracks")
        pad_mask = pad_masks["tracks"]
        jets = self._input(inputs, "jets") if "jets" in self.variables else None
        glob = self._input(inputs, "global") if "global" in self.variables else None
        layout = self.layout(tracks.device)
        if layout == "padded":
            outputs = self._forward_padded(tracks, jets, glob, pad_mask)
        else:
            packing = Packing.from_mask(pad_mask, jets_per_size)
            outputs = self._forward_packed(tracks, jets, glob, packing, layout == "varlen")
        if labels is None:
            return outputs, {}
        losses = {
            name: task.loss(outputs[name], task.target(labels), pad_mask)
            for name, task in self.tasks.items()
        }
        weights = {name: task.weight for name, task in self.tasks.items()}
        losses["loss"] = total_loss(losses, weights, self.loss_mode)
        return outputs, losses

    def _forward_padded(
        self, tracks: Tensor, jets: Tensor | None, glob: Tensor | None, pad_mask: Tensor
    ) -> dict[str, Tensor]:
        """The task outputs, computing on every track slot (the reference path)."""
        # x: the tracks, then the encoder's registers (seen by the pooling, not the tasks)
        x, seq_mask = self.encoder(self.init_net(tracks, jets), pad_mask)
        if glob is not None:
            glob = glob.to(x.dtype)
            x = _concat_masked(x, glob[:, None, :].expand(-1, x.shape[1], -1), seq_mask)
        pooled = self.pooling(x, seq_mask)
        x = x[:, : pad_mask.shape[1]]
        return {name: task(pooled, x, pad_mask) for name, task in self.tasks.items()}

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
        return "varlen" if low_precision and varlen else "padded"

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
        self.init_net.compile_tail(backend)
        for layer in self.encoder.layers:
            layer.compile_feed_forward(backend)
        for task in self.tasks.values():
            task.net.compile_tail(backend)

    def _forward_packed(
        self,
        tracks: Tensor,
        jets: Tensor | None,
        glob: Tensor | None,
        packing: Packing,
        varlen: bool,
    ) -> dict[str, Tensor]:
        """The same outputs, computing per-track parts on the real tracks only."""
        if packing.num_tracks == 0:
            # nothing to pack; the padded path keeps every parameter in the autograd graph
            # (zero gradients, not None), as the same function must
            return self._forward_padded(tracks, jets, glob, packing.pad_mask)
        x = self.init_net(packing.pack(tracks), jets, packing)
        x, seq = self.encoder.forward_packed(x, packing, varlen)  # seq: tracks and registers
        if glob is not None:
            x = torch.cat([x, seq.per_track(glob.to(x.dtype))], dim=-1)
        pooled = self.pooling.forward_packed(x, seq)
        x = seq.tracks(x)
        return {name: task.forward_packed(pooled, x, packing) for name, task in self.tasks.items()}

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


def check_backend(backend: str, attention_type: str) -> str:
    """`backend` if it is one of ATTENTION_BACKENDS and fits the attention type."""
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
    return str(backend)


def _concat_masked(x: Tensor, extra: Tensor, pad_mask: Tensor) -> Tensor:
    """Concatenate `extra` to `x` along features; padded slots stay zero."""
    return torch.cat([x, extra], dim=-1).masked_fill(pad_mask.unsqueeze(-1), 0.0)


def input_variables(model_cfg: ModelConfig | ModelNode) -> dict[str, list[str]]:
    """The input variable lists by input type ("jets", "tracks", "global"), for the loader."""
    return {k: list(v) for k, v in ModelConfig.read(model_cfg).variables.items()}


def label_specs(model_cfg: ModelConfig | ModelNode) -> dict[str, dict[str, LabelSpec]]:
    """`{input_type: {label: LabelSpec}}` of all tasks, for the loader to read the labels.

    Classification labels carry their class count (`len(class_names)`), so the loader refuses
    values the task has no class for; vertexing labels (and a vertexing task's origin_label,
    unless a classification task reads it) are read as integers (`LabelSpec()`),
    regression targets as float32 (`LabelSpec(continuous=True)`). Two tasks reading the same
    label with different label maps is a config error; two classification tasks sharing an
    unmapped label get the smaller class count.
    """
    specs: dict[str, dict[str, LabelSpec]] = {}
    owner: dict[tuple[str, str], str] = {}
    reads = []  # (task, input, label, label_map, classes, continuous)
    for name, task in ModelConfig.read(model_cfg).tasks.items():
        kind = task.type
        classes = len(task.class_names or []) if kind == TaskType.classification else None
        mapping = dict(task.label_map) if task.label_map is not None else None
        reads.append((name, task.input, task.label, mapping, classes, kind == TaskType.regression))
        if kind == TaskType.vertexing and task.origin_label:  # pair weights, unmapped
            reads.append((name, "tracks", task.origin_label, None, None, False))
    for name, input_type, label, mapping, classes, continuous in reads:
        key = (input_type, label)
        spec = LabelSpec(
            mapping, classes, name if classes is not None else None, continuous=continuous
        )
        if key in owner:
            seen = specs[key[0]][key[1]]
            if seen.label_map != mapping:
                raise ModelConfigError(
                    f"model.tasks.{owner[key]} and model.tasks.{name} read label {key[1]!r} of "
                    f"{key[0]} with different label_map ({seen.label_map} vs {mapping})"
                )
            if classes is None or (seen.num_classes is not None and seen.num_classes <= classes):
                continue  # the stricter spec already read wins: both tasks get valid values
        owner.setdefault(key, name)
        specs.setdefault(key[0], {})[key[1]] = spec
    return specs


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
            label=spec.label,
            class_names=list(spec.class_names or []),
            input_size=pooled_size if on_jets else track_size,
            context_size=context_size,
            weight=spec.weight,
            label_map=dict(spec.label_map) if spec.label_map is not None else None,
            class_weights=_class_weights(name, spec, class_dict) if loss_weights else None,
            **dense,
        )
    if spec.type == TaskType.vertexing:
        return VertexingTask(
            name=name,
            label=spec.label,
            input_size=track_size,
            context_size=context_size,
            weight=spec.weight,
            origin_label=spec.origin_label,
            reduction=str(spec.reduction),
            **dense,
        )
    return RegressionTask(
        name=name,
        label=spec.label,
        input_size=pooled_size,
        loss=str(spec.loss),
        huber_delta=float(spec.huber_delta or 1.0),
        weight=spec.weight,
        **dense,
    )


def build_tagger(
    model_cfg: ModelConfig | ModelNode,
    class_dict: Mapping[str, Any] | None = None,
    backend: str | None = None,
    loss_weights: bool = True,
) -> Tagger:
    """Build the tagger described by the `model` config node.

    `class_dict` ({input: {label: [weight per class]}}) supplies the class weights of tasks
    with `use_class_weights: true`; `loss_weights=False` builds for inference only (class
    weights only enter the training loss), without a class_dict. `backend` overrides
    `model.attention.backend` (see `Tagger`).
    """
    cfg = ModelConfig.read(model_cfg)
    label_specs(cfg)  # the label_map consistency check
    variables = {k: list(v) for k, v in cfg.variables.items()}
    init_net = Dense(
        len(variables["tracks"]),
        cfg.embed_dim,
        context_size=len(variables.get("jets", [])),
        **cfg.init_net.layers(),
    )
    encoder = _encoder(cfg)
    track_size = encoder.out_dim + len(variables.get("global", []))
    pooling = _pooling(cfg.pooling, track_size, encoder.out_dim)
    tasks = {
        name: _task(name, spec, track_size, pooling.output_size, class_dict, loss_weights)
        for name, spec in cfg.tasks.items()
    }
    backend = backend or str(cfg.attention.backend)
    return Tagger(cfg.name, variables, init_net, encoder, pooling, tasks, backend, cfg.loss_mode)
