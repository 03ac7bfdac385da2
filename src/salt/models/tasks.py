"""Task heads: a dense network on the pooled jet vector or the track vectors, and its loss.

- `ClassificationTask`: jets (`[B, C]` logits) or tracks (`[B, T, C]`), cross entropy with
  optional class weights. Negative labels (padded tracks, unknown origin) are ignored.
- `VertexingTask`: a logit for every ordered pair of tracks (`[B, T, T]`): do tracks i and
  j come from the same vertex? Target: equal `ftagTruthVertexIndex` and index >= 0. The loss
  is the binary cross entropy over ordered pairs of distinct real tracks (i != j; the
  diagonal is trivially "same vertex" and carries no information), as the old tool's: with
  the track origins (`origin_label`), pairs of a heavy-flavour track (from B, BC or C) with a
  heavy-flavour or fake track weigh 2, pairs of two fakes 0, the rest 1; the sum is divided
  by the number of same-vertex pairs (`reduction: positive_pairs`) or by the weights' sum
  (`reduction: pairs`, a weighted mean).
- `RegressionTask`: one or several variables (`targets`) of the jet (`[B, K]`) or of each
  object (`[B, T, K]`), each divided by its denominator and scaled (`salt.models.scaling`);
  MSE, Huber, L1 or the Gaussian negative log-likelihood (the head then outputs the mean and
  the log-variance of each target, `[..., 2K]`). Non-finite targets (missing, NaN after the
  division or the scaling) and padded slots are ignored.

Jet classification and regression tasks may weight each jet's loss terms by a jet variable
(`sample_weight`): the loss is then `sum(w * l) / sum(w)` (times the class weights, if any),
over the terms that count.

Track tasks may take the pooled jet vector as context, appended to every track (pair).
Outputs on padded tracks (pairs with a padded track) are set to 0. Losses are finite for
jets without real tracks; a batch without any real track gives a track loss of 0.
`forward_packed` computes the same outputs from packed tracks (see `salt.models.packing`):
the heads run on the real tracks (pairs of real tracks) only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor, nn

from salt.errors import ModelConfigError
from salt.models.dense import Dense, DenseConfig
from salt.models.packing import Packing
from salt.models.scaling import ScalingConfig, TargetScaler
from salt.utils import typed_config as check


class TaskType(enum.StrEnum):
    classification = "classification"
    vertexing = "vertexing"
    regression = "regression"


VERTEXING_REDUCTIONS = ("positive_pairs", "pairs")
REGRESSION_LOSSES = ("mse", "huber", "l1", "gaussian_nll")
# the Gaussian head's log-variance is clamped below at log(1e-6), as torch's GaussianNLLLoss
# clamps the variance: a vanishing width would divide by ~0
MIN_LOG_VARIANCE = -13.815510557964274
# what each task type acts on: the jet, and/or the objects of one type (tracks, flows, ...:
# any object type of the model, checked against model.variables)
ON_JETS = {"classification": True, "vertexing": False, "regression": True}
ON_OBJECTS = {"classification": True, "vertexing": True, "regression": True}
# keys that only one task type takes, with their defaults
TYPE_KEYS: dict[str, dict[str, Any]] = {
    "classification": {"class_names": None, "label_map": None, "use_class_weights": False},
    "vertexing": {"origin_label": None, "reduction": "positive_pairs"},
    "regression": {
        "targets": None,
        "target_denominators": None,
        "scaling": None,
        "loss": "mse",
        "huber_delta": 1.0,
    },
}
# the task types that take a per-jet sample_weight (on jet tasks)
WEIGHTED = ("classification", "regression")


@dataclass
class TaskConfig(DenseConfig):
    """One task node `model.tasks.<name>`: the head's dense settings, what it reads and its
    loss weight, then the keys of its type (null where the type has none: checked)."""

    type: TaskType = MISSING
    input: str = MISSING  # what it acts on: jets, or an object type (tracks, flows, ...)
    # the label variable of those objects (regression: its one target, or use targets)
    label: str | None = None
    weight: float = 1.0  # of its loss in the total
    context: bool = False  # track tasks: append the pooled jet vector to every track
    # jet classification/regression: each jet's loss terms weighted by this jet variable
    sample_weight: str | None = None
    # classification
    class_names: list[str] | None = None
    label_map: dict[int, int] | None = None  # file label -> class index (-1: ignored)
    use_class_weights: bool | None = None  # weights from the class_dict
    # vertexing
    origin_label: str | None = None  # track origins: heavy-flavour pairs weigh 2, fakes 0
    reduction: str | None = None  # positive_pairs | pairs
    # regression
    targets: list[str] | None = None  # several targets (or one: label)
    target_denominators: list[str] | None = None  # per target: divided by this variable
    scaling: dict[str, ScalingConfig] | None = None  # target -> its scaling, after the division
    loss: str | None = None  # mse | huber | l1 | gaussian_nll
    huber_delta: float | None = None

    def check(self, where: str) -> None:
        super().check(where)
        kind = str(self.type)
        for other, keys in TYPE_KEYS.items():
            for key in keys:
                if other != kind and getattr(self, key) is not None:
                    raise ModelConfigError(
                        f"{where}.{key}: a {kind} task has no {key} (a {other} key); "
                        f"its own: {', '.join(TYPE_KEYS[kind])}"
                    )
        for key, default in TYPE_KEYS[kind].items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        on_jets = self.input == "jets"
        if (on_jets and not ON_JETS[kind]) or (not on_jets and not ON_OBJECTS[kind]):
            takes = "jets" if ON_JETS[kind] else "an object type (tracks, flows, ...)"
            if ON_JETS[kind] and ON_OBJECTS[kind]:
                takes = "jets or an object type"
            raise ModelConfigError(
                f"{where}.input: a {kind} task takes {takes}, got {self.input!r}"
            )
        check.at_least(self.weight, f"{where}.weight", 0.0)
        if self.context and on_jets:
            raise ModelConfigError(
                f"{where}.context: only object tasks (tracks, ...) take the pooled jet vector "
                "as context"
            )
        self._check_label(where, kind)
        if self.sample_weight is not None and (kind not in WEIGHTED or not on_jets):
            raise ModelConfigError(
                f"{where}.sample_weight: per-jet weights apply to jet classification and "
                f"regression tasks (input: jets), not to a {kind} task on {self.input}"
            )
        if kind == "classification":
            # None: taken from the training file's class names (salt.data.class_names)
            if self.class_names is not None and len(self.class_names) < 2:
                raise ModelConfigError(f"{where}.class_names must list at least 2 classes")
            if self.class_names is None and self.label_map is not None:
                raise ModelConfigError(
                    f"{where}.class_names: a task with a label_map names its own classes"
                )
            if self.class_names is not None:
                _check_label_map(self.label_map, where, len(self.class_names))
        if kind == "vertexing":
            check.one_of(self.reduction, f"{where}.reduction", VERTEXING_REDUCTIONS)
        if kind == "regression":
            self._check_regression(where)

    def _check_label(self, where: str, kind: str) -> None:
        """Classification and vertexing read `label`; regression `label` (one target) or
        `targets`, not both."""
        if kind != "regression":
            if not self.label:
                raise ModelConfigError(
                    f"{where}.label: missing: a {kind} task reads its truth from a label "
                    "variable; set label"
                )
            return
        if self.label and self.targets is not None:
            raise ModelConfigError(
                f"{where}.targets: a regression task takes label (one target) or targets (a "
                f"list), not both; got label={self.label!r} and targets={list(self.targets)}"
            )
        if not self.label and not self.targets:
            raise ModelConfigError(
                f"{where}.targets: missing: a regression task needs label (one target) or "
                "targets (a list of target variables)"
            )

    def _check_regression(self, where: str) -> None:
        check.one_of(self.loss, f"{where}.loss", REGRESSION_LOSSES)
        if not (self.huber_delta or 0) > 0:
            raise ModelConfigError(f"{where}.huber_delta={self.huber_delta}: expected a number > 0")
        targets = self.target_names()
        doubled = sorted({t for t in targets if targets.count(t) > 1})
        if doubled or not all(targets):
            raise ModelConfigError(
                f"{where}.targets: expected distinct variable names, got {targets}"
            )
        denominators = self.target_denominators
        if denominators is not None and (
            len(denominators) != len(targets) or not all(denominators)
        ):
            raise ModelConfigError(
                f"{where}.target_denominators: one variable per target ({len(targets)}: "
                f"{targets}), got {list(denominators)}"
            )
        for target, scaling in (self.scaling or {}).items():
            if target not in targets:
                raise ModelConfigError(
                    f"{where}.scaling.{target}: not a target of this task; its targets: {targets}"
                )
            scaling.check(f"{where}.scaling.{target}")

    def target_names(self) -> list[str]:
        """A regression task's targets: `targets`, or its one `label`."""
        if self.targets is not None:
            return [str(t) for t in self.targets]
        return [str(self.label)] if self.label else []

    def dense(self) -> DenseConfig:
        """The head's own network settings."""
        return DenseConfig(**{f.name: getattr(self, f.name) for f in fields(DenseConfig)})


def _check_label_map(mapping: dict[int, int] | None, where: str, num_classes: int) -> None:
    """A label map covers the class indices 0..num_classes-1 (-1: labels the loss ignores)."""
    if mapping is None:
        return
    if not mapping:
        raise ModelConfigError(f"{where}.label_map must be a non-empty mapping or null")
    if sorted(set(mapping.values()) - {-1}) != list(range(num_classes)):
        raise ModelConfigError(
            f"{where}.label_map values {sorted(set(mapping.values()))} must be exactly the "
            f"class indices 0..{num_classes - 1} of class_names ({num_classes} classes), "
            f"or -1 for labels the loss ignores"
        )


def _at_least_fp32(x: Tensor) -> Tensor:
    """Losses and probabilities in fp32 even under fp16/bf16 autocast (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _safe_mean(total: Tensor, count: Tensor) -> Tensor:
    """`total / count`, or 0 when nothing was counted (no host sync)."""
    return total / torch.where(count > 0, count, torch.ones_like(count))


def weighted_cross_entropy(
    logits: Tensor, target: Tensor, weight: Tensor | None, sample_weight: Tensor | None = None
) -> Tensor:
    """Cross entropy of `logits[N, C]` and `target[N]`, ignoring negative targets.

    With class weights it is the weighted mean (as `nn.CrossEntropyLoss(weight=...)`); per-row
    `sample_weight[N]` multiply those: `sum(w * l) / sum(w)`.
    """
    valid = target >= 0
    safe = target.clamp_min(0)
    nll = F.cross_entropy(_at_least_fp32(logits), safe, reduction="none")
    w = valid.to(nll.dtype) if weight is None else weight[safe] * valid
    if sample_weight is not None:
        w = w * sample_weight.to(nll.dtype)
    return _safe_mean((nll * w).sum(), w.sum())


class Task(nn.Module):
    """Base of all task heads: identity, label and loss weight."""

    def __init__(
        self,
        name: str,
        input_type: str,
        label: str,
        weight: float = 1.0,
        class_names: Sequence[str] | None = None,
        label_map: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.input_type = input_type
        self.label = label
        self.weight = float(weight)
        self.class_names = list(class_names) if class_names is not None else None
        self.label_map = dict(label_map) if label_map is not None else None

    def target(self, labels: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        """This task's labels from the batch's `labels` dict."""
        return self._read(labels, self.input_type, self.label)

    def _read(
        self,
        labels: Mapping[str, Mapping[str, Tensor]],
        input_type: str,
        name: str,
        what: str = "",
    ) -> Tensor:
        """`labels[input_type][name]`, or a KeyError naming the task (and `what` it is)."""
        try:
            return labels[input_type][name]
        except KeyError:
            raise KeyError(
                f"task {self.name}: the batch has no label labels[{input_type!r}][{name!r}]"
                f"{f' (its {what})' if what else ''}"
            ) from None

    def _with_sample_weight(
        self, target: Tensor, labels: Mapping[str, Mapping[str, Tensor]], sample_weight: str | None
    ) -> Tensor:
        """`target[B, ...]` as float with each jet's `sample_weight` as a last column (one
        tensor, as `loss` takes it); unchanged without a sample weight."""
        if sample_weight is None:
            return target
        weight = self._read(labels, "jets", sample_weight, "sample_weight")
        values = _at_least_fp32(target.to(weight.dtype))
        if values.dim() == weight.dim():
            values = values.unsqueeze(-1)
        return torch.cat([values, weight.to(values.dtype).unsqueeze(-1)], dim=-1)

    def forward(self, pooled: Tensor, tracks: Tensor, pad_mask: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_packed(self, pooled: Tensor, tracks: Tensor, packing: Packing) -> Tensor:
        """`forward` from packed tracks `[N, D]` (see `Packing`); the output is padded as
        `forward`'s. This default unpacks the tracks; subclasses compute on the packed rows."""
        return self.forward(pooled, packing.unpack(tracks), packing.pad_mask)

    def loss(self, output: Tensor, target: Tensor, pad_mask: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, output: Tensor) -> Tensor:
        raise NotImplementedError


class HeadTask(Task):
    """A dense head on the pooled jet vector (jet tasks) or on each object of its type (with
    the pooled vector as context if built so); outputs on padded slots are 0."""

    net: Dense

    def forward(self, pooled: Tensor, tracks: Tensor, pad_mask: Tensor) -> Tensor:
        if self.input_type == "jets":
            return self.net(pooled)
        context = pooled if self.net.context_size else None
        return self.net(tracks, context).masked_fill(pad_mask.unsqueeze(-1), 0.0)

    def forward_packed(self, pooled: Tensor, tracks: Tensor, packing: Packing) -> Tensor:
        if self.input_type == "jets":
            return self.net(pooled)
        context = pooled if self.net.context_size else None
        return packing.unpack(self.net(tracks, context, packing))


class ClassificationTask(HeadTask):
    """Jet or track classification into `len(class_names)` classes.

    With `sample_weight` (jet tasks), `target` gives the labels and the jets' weights as one
    float tensor `[B, 2]` (class indices are exact in float32)."""

    def __init__(
        self,
        name: str,
        input_type: str,
        label: str,
        class_names: Sequence[str],
        input_size: int,
        context_size: int = 0,
        hidden_layers: Sequence[int] = (),
        activation: str = "SiLU",
        norm: str | None = "LayerNorm",
        dropout: float = 0.0,
        weight: float = 1.0,
        label_map: Mapping[int, int] | None = None,
        class_weights: Sequence[float] | None = None,
        sample_weight: str | None = None,
    ) -> None:
        super().__init__(name, input_type, label, weight, class_names, label_map)
        if sample_weight is not None and input_type != "jets":
            raise ValueError(f"task {name}: sample_weight applies to jet tasks only")
        self.sample_weight = sample_weight
        num_classes = len(class_names)
        self.net = Dense(
            input_size, num_classes, hidden_layers, activation, norm, dropout, context_size
        )
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(
                f"task {name}: {len(class_weights)} class weights for {num_classes} classes"
            )
        # Not persistent: weights come from the class_dict, not from the checkpoint.
        cw = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", cw, persistent=False)

    def target(self, labels: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        return self._with_sample_weight(super().target(labels), labels, self.sample_weight)

    def loss(self, output: Tensor, target: Tensor, pad_mask: Tensor) -> Tensor:
        sample_weight = None
        if self.sample_weight is not None:
            target, sample_weight = target[..., 0], target[..., 1]
        if self.input_type != "jets":  # objects: padded slots carry no class
            target = target.masked_fill(pad_mask, -1)
        return weighted_cross_entropy(
            output.flatten(0, -2), target.flatten().long(), self.class_weights, sample_weight
        )

    def predict(self, output: Tensor) -> Tensor:
        return torch.softmax(_at_least_fp32(output), dim=-1)


# ftagTruthOriginLabel classes: the old tool's vertexing weights single these out
FAKE_ORIGIN = 1
HEAVY_FLAVOUR_ORIGINS = (3, 4, 5)  # fromB, fromBC, fromC


class VertexingTask(Task):
    """Same-vertex classification of every ordered track pair.

    The pair network's input is `[x_i; x_j; context]`; its first layer is computed as
    `W1 x_i + W2 x_j + W3 c` (per-track projections added pairwise), the same math as the
    concatenation at a fraction of the cost. `origin_label` (the track origin label, read
    unmapped) weights the pairs; `reduction` divides the loss sum (see the module doc).
    """

    def __init__(
        self,
        name: str,
        label: str,
        input_size: int,
        context_size: int = 0,
        hidden_layers: Sequence[int] = (),
        activation: str = "SiLU",
        norm: str | None = None,
        dropout: float = 0.0,
        weight: float = 1.0,
        origin_label: str | None = None,
        reduction: str = "positive_pairs",
        input_type: str = "tracks",
    ) -> None:
        super().__init__(name, input_type, label, weight)
        if reduction not in VERTEXING_REDUCTIONS:
            raise ValueError(f"task {name}: reduction must be one of {VERTEXING_REDUCTIONS}")
        self.origin_label = origin_label
        self.reduction = reduction
        self.net = Dense(
            [input_size, input_size], 1, hidden_layers, activation, norm, dropout, context_size
        )

    def target(self, labels: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        """The vertex index `[B, T]`, stacked with the track origin (`[B, T, 2]`) when the
        pairs are weighted by origin."""
        vertex = super().target(labels)
        if self.origin_label is None:
            return vertex
        try:
            origin = labels[self.input_type][self.origin_label]
        except KeyError:
            raise KeyError(
                f"task {self.name}: the batch has no label labels[{self.input_type!r}]"
                f"[{self.origin_label!r}] (its origin_label)"
            ) from None
        return torch.stack([vertex, origin.to(vertex.dtype)], dim=-1)

    def forward(self, pooled: Tensor, tracks: Tensor, pad_mask: Tensor) -> Tensor:
        first = self.net.first
        x_i, x_j = first.project(0, tracks), first.project(1, tracks)  # [B, T, H]
        if self.net.context_size:  # W3 c + bias, once per jet
            per_jet = first.project(2, pooled, bias=True)[:, None, None, :]
        else:
            per_jet = first.linear.bias
        # pairwise sum [B, T, T, H]; per_jet cast to the (autocast) dtype of the projections
        h = x_i.unsqueeze(2) + x_j.unsqueeze(1) + per_jet.to(x_i.dtype)
        logits = self.net.tail(h).squeeze(-1)  # [B, T, T]
        pair_pad = pad_mask.unsqueeze(2) | pad_mask.unsqueeze(1)
        return logits.masked_fill(pair_pad, 0.0)

    def forward_packed(self, pooled: Tensor, tracks: Tensor, packing: Packing) -> Tensor:
        """The pair net on the pairs of real tracks only, padded to `[B, T, T]`."""
        first = self.net.first
        x_i = first.project(0, tracks)  # [N, H]
        if self.net.context_size:  # W3 c + bias, once per jet, folded into the first track
            x_i = x_i + packing.per_track(first.project(2, pooled, bias=True))
        else:
            x_i = x_i + first.linear.bias.to(x_i.dtype)
        h = packing.pairwise(x_i, first.project(1, tracks))  # [P, H]
        return packing.unpack_pairs(self.net.tail(h).squeeze(-1))

    def loss(self, output: Tensor, target: Tensor, pad_mask: Tensor) -> Tensor:
        vertex, origin = (target, None) if target.dim() == 2 else target.unbind(-1)
        real = ~pad_mask
        eye = torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
        pairs = real.unsqueeze(2) & real.unsqueeze(1) & ~eye
        same = (vertex.unsqueeze(2) == vertex.unsqueeze(1)) & (vertex >= 0).unsqueeze(2)
        output = _at_least_fp32(output)
        bce = F.binary_cross_entropy_with_logits(output, same.to(output.dtype), reduction="none")
        weights = pairs.to(bce.dtype)
        if origin is not None:
            weights = weights * pair_weights(origin).to(bce.dtype)
        total = (bce * weights).sum()
        if self.reduction == "positive_pairs":
            return _safe_mean(total, (same & pairs).sum().to(bce.dtype))
        return _safe_mean(total, weights.sum())

    def predict(self, output: Tensor) -> Tensor:
        return torch.sigmoid(_at_least_fp32(output))


def pair_weights(origin: Tensor) -> Tensor:
    """`[B, T, T]` weights of track pairs from the track origins `[B, T]`: 2 for a
    heavy-flavour track with a heavy-flavour or fake track, 0 for two fakes, else 1."""
    heavy = torch.zeros_like(origin, dtype=torch.bool)
    for value in HEAVY_FLAVOUR_ORIGINS:
        heavy |= origin == value
    fake = origin == FAKE_ORIGIN
    flagged = heavy | fake
    up = flagged.unsqueeze(2) & flagged.unsqueeze(1) & (heavy.unsqueeze(2) | heavy.unsqueeze(1))
    down = fake.unsqueeze(2) & fake.unsqueeze(1)
    return 1 + up.to(torch.int8) - down.to(torch.int8)


class RegressionTask(HeadTask):
    """Regression of `targets` (variables of the jet, or of each object of `input_type`).

    The head outputs, per target, the value in its scaled units (see `salt.models.scaling`:
    divided by its denominator, then scaled), `[B, K]` on jets and `[B, T, K]` on objects; with
    the `gaussian_nll` loss the means, then the log-variances (`[..., 2K]`). `target` gives the
    targets in those units (NaN where missing or padded), with the jet's sample weight as a
    last column when the task has one. `predict` goes back to the targets' units.
    """

    def __init__(
        self,
        name: str,
        targets: str | Sequence[str],
        input_size: int,
        loss: str = "mse",
        huber_delta: float = 1.0,
        hidden_layers: Sequence[int] = (),
        activation: str = "SiLU",
        norm: str | None = "LayerNorm",
        dropout: float = 0.0,
        weight: float = 1.0,
        input_type: str = "jets",
        context_size: int = 0,
        denominators: Sequence[str] | None = None,
        scaling: Mapping[str, ScalingConfig] | None = None,
        sample_weight: str | None = None,
    ) -> None:
        targets = [targets] if isinstance(targets, str) else list(targets)
        super().__init__(name, input_type, targets[0], weight)
        if loss not in REGRESSION_LOSSES:
            raise ValueError(f"task {name}: loss must be one of {REGRESSION_LOSSES}, got {loss!r}")
        if denominators is not None and len(denominators) != len(targets):
            raise ValueError(f"task {name}: one denominator per target {targets}")
        if sample_weight is not None and input_type != "jets":
            raise ValueError(f"task {name}: sample_weight applies to jet tasks only")
        self.targets = targets
        self.denominators = list(denominators) if denominators else None
        self.sample_weight = sample_weight
        self.loss_type = loss
        self.huber_delta = float(huber_delta)
        self.scaler = TargetScaler(targets, scaling)
        outputs = len(targets) * (2 if self.gaussian else 1)
        self.net = Dense(
            input_size, outputs, hidden_layers, activation, norm, dropout, context_size
        )

    @property
    def gaussian(self) -> bool:
        return self.loss_type == "gaussian_nll"

    def target(self, labels: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        """The targets in the head's units `[..., K]` (+ the sample weight column)."""
        columns = [self._read(labels, self.input_type, t, "target") for t in self.targets]
        values = _at_least_fp32(torch.stack(columns, dim=-1))
        if self.denominators is not None:
            denominators = [
                self._read(labels, self.input_type, d, "target denominator")
                for d in self.denominators
            ]
            values = values / torch.stack(denominators, dim=-1).to(values.dtype)
        return self._with_sample_weight(self.scaler.scale(values), labels, self.sample_weight)

    def loss(self, output: Tensor, target: Tensor, pad_mask: Tensor) -> Tensor:
        output = _at_least_fp32(output)
        target = target.to(output.dtype)
        weight = None
        if self.sample_weight is not None:
            target, weight = target[..., :-1], target[..., -1:]
        k = len(self.targets)
        mean = output[..., :k]
        valid = torch.isfinite(target)
        if self.input_type != "jets":  # objects: padded slots carry no target
            valid = valid & ~pad_mask.unsqueeze(-1)
        target = torch.where(valid, target, mean.detach())  # ignored entries: finite, no gradient
        if self.gaussian:
            log_var = output[..., k:].clamp_min(MIN_LOG_VARIANCE)
            per_value = 0.5 * (log_var + (target - mean) ** 2 * torch.exp(-log_var))
        elif self.loss_type == "mse":
            per_value = F.mse_loss(mean, target, reduction="none")
        elif self.loss_type == "l1":
            per_value = F.l1_loss(mean, target, reduction="none")
        else:
            per_value = F.huber_loss(mean, target, reduction="none", delta=self.huber_delta)
        w = valid.to(per_value.dtype)
        if weight is not None:
            w = w * weight
        return _safe_mean((per_value * w).sum(), w.sum())

    def predict(self, output: Tensor, denominators: Tensor | None = None) -> Tensor:
        """Values in the targets' units `[..., K]` (Gaussian: then the widths σ, `[..., 2K]`).

        The scaling is inverted; the values are multiplied by `denominators[..., K]` (the
        objects' denominator variables, raw), and σ = exp(log-variance / 2) by the slope of
        the inverse scaling and |denominator| (the delta method). Without `denominators`, a
        task with denominators predicts target / denominator.
        """
        output = _at_least_fp32(output)
        k = len(self.targets)
        mean = output[..., :k]
        values = self.scaler.inverse(mean)
        if denominators is not None:
            denominators = denominators.to(values.dtype)
            values = values * denominators
        if not self.gaussian:
            return values
        log_var = output[..., k:].clamp_min(MIN_LOG_VARIANCE)
        sigma = torch.exp(0.5 * log_var) * self.scaler.inverse_slope(mean)
        if denominators is not None:
            sigma = sigma * denominators.abs()
        return torch.cat([values, sigma], dim=-1)


def regression_output_names(tasks: Sequence[Task]) -> dict[str, list[str]]:
    """Task name -> the names of its predicted columns (no model prefix), for the regression
    tasks among `tasks`: the old tool's `<target>` and `<target>_stddev`; a target that two of
    the tasks regress gets the task's name instead: `<task>` for a one-target task,
    `<task>_<target>` otherwise (each followed by `_stddev` for a width)."""
    regressions = [t for t in tasks if isinstance(t, RegressionTask)]
    counts: dict[str, int] = {}
    for task in regressions:
        for target in task.targets:
            counts[target] = counts.get(target, 0) + 1
    names: dict[str, list[str]] = {}
    for task in regressions:
        own = {
            t: t if counts[t] == 1 else task.name if len(task.targets) == 1 else f"{task.name}_{t}"
            for t in task.targets
        }
        stddev = [f"{own[t]}_stddev" for t in task.targets] if task.gaussian else []
        names[task.name] = [*(own[t] for t in task.targets), *stddev]
    return names
