"""Reading the `model` config node: allowed keys, defaults and the config errors.

Every model sub-node (init net, encoder, attention, pooling, each task) is checked here
against one table of allowed keys, so a typo is one clear error naming the key path
instead of a silently ignored setting. The attention and pooling nodes are special:
Hydra's `attention=...` and `pooling=...` groups merge into the model's node, so keys that
belong to another type of the same node may be left over; those are ignored, keys that
belong to no type are errors.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from salt.errors import ModelConfigError
from salt.models.tasks import VERTEXING_REDUCTIONS

REQUIRED = object()  # marks a key without default

INPUT_TYPES = ("jets", "tracks", "global")

MODEL_KEYS: dict[str, Any] = {
    "name": REQUIRED,
    "variables": REQUIRED,
    "embed_dim": REQUIRED,
    "init_net": {},
    "encoder": REQUIRED,
    "attention": REQUIRED,
    "pooling": REQUIRED,
    "tasks": REQUIRED,
}

DENSE_KEYS: dict[str, Any] = {
    "hidden_layers": [],
    "activation": "SiLU",
    "norm": "LayerNorm",
    "dropout": 0.0,
}

ENCODER_KEYS: dict[str, Any] = {
    "num_layers": REQUIRED,
    "out_dim": None,  # None: keep embed_dim (no output projection)
    "ff_hidden_scale": 2,
    "dropout": 0.0,
    "activation": "SiLU",
    "num_registers": 1,  # learned tokens appended to every jet's tracks (0: none)
    "norm_affine": False,  # learned scale and shift in the encoder's LayerNorms
}

ATTENTION_COMMON_KEYS: dict[str, Any] = {
    "type": REQUIRED,
    "num_heads": None,
    "head_dim": None,
    "dropout": 0.0,
}
# the encoder's self-attention also picks how it is computed (salt.models.tagger.Tagger)
ENCODER_ATTENTION_KEYS: dict[str, Any] = {**ATTENTION_COMMON_KEYS, "backend": "auto"}
ATTENTION_TYPE_KEYS: dict[str, dict[str, Any]] = {
    "scaled_dot_product": {},
    "gatv2": {"negative_slope": 0.2},
}

POOLING_TYPE_KEYS: dict[str, dict[str, Any]] = {
    "global_attention": {},
    "cross_attention": {
        "num_layers": 2,
        "out_dim": None,  # None: the encoder out_dim
        "attention": REQUIRED,
        "dense": {},
    },
}

TASK_COMMON_KEYS: dict[str, Any] = {
    "type": REQUIRED,
    "input": REQUIRED,
    "label": REQUIRED,
    "weight": 1.0,
    "context": False,  # track tasks: append the pooled jet vector to every track
    **DENSE_KEYS,
}
TASK_TYPE_KEYS: dict[str, dict[str, Any]] = {
    "classification": {"class_names": REQUIRED, "label_map": None, "use_class_weights": False},
    # origin_label: weight pairs by track origin; reduction: VERTEXING_REDUCTIONS
    "vertexing": {"origin_label": None, "reduction": "positive_pairs"},
    "regression": {"loss": "mse", "huber_delta": 1.0},
}
TASK_INPUTS: dict[str, tuple[str, ...]] = {
    "classification": ("jets", "tracks"),
    "vertexing": ("tracks",),
    "regression": ("jets",),
}


def to_dict(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """Return a plain, resolved dict from a DictConfig or a mapping."""
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if not isinstance(cfg, Mapping):
        raise ModelConfigError(f"model config must be a mapping, got {type(cfg).__name__}")
    return {k: to_dict(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}


def take(
    cfg: Any,
    where: str,
    keys: Mapping[str, Any],
    ignored: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    """Check `cfg` against allowed `keys` (name -> default or REQUIRED) and fill defaults.

    Keys in `ignored` are dropped silently (they belong to another type of the same node).
    """
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ModelConfigError(f"{where} must be a mapping, got {cfg!r}")
    unknown = sorted(str(k) for k in cfg if k not in keys and k not in ignored)
    if unknown:
        raise ModelConfigError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(keys)}"
        )
    out: dict[str, Any] = {}
    for key, default in keys.items():
        if key in cfg:
            out[key] = cfg[key]
        elif default is REQUIRED:
            raise ModelConfigError(f"{where}: missing required key '{key}'")
        else:
            out[key] = copy.deepcopy(default)  # callers may modify their node
    return out


def take_typed(
    cfg: Any,
    where: str,
    common: Mapping[str, Any],
    by_type: Mapping[str, Mapping[str, Any]],
    ignore_other_types: bool,
) -> dict[str, Any]:
    """Like `take` for a node with a `type` key whose allowed keys depend on the type."""
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise ModelConfigError(f"{where}: missing required key 'type' (one of {sorted(by_type)})")
    kind = cfg["type"]
    if kind not in by_type:
        raise ModelConfigError(
            f"{where}.type: unknown type {kind!r}; choose one of {sorted(by_type)}"
        )
    keys = {"type": REQUIRED, **common, **by_type[kind]}
    ignored: set[str] = set()
    if ignore_other_types:
        ignored = {k for other in by_type.values() for k in other} - set(keys)
    return take(cfg, where, keys, ignored)


def encoder_attention(cfg: Any) -> dict[str, Any]:
    """The checked `model.attention` node (the encoder's self-attention)."""
    return take_typed(
        cfg,
        "model.attention",
        ENCODER_ATTENTION_KEYS,
        ATTENTION_TYPE_KEYS,
        ignore_other_types=True,
    )


def attention_backend(cfg: Any) -> str:
    """`model.attention.backend`: how the encoder's self-attention is computed."""
    return str(encoder_attention(cfg)["backend"])


def check_activation(name: Any, where: str) -> str:
    """Return `name` if it names a torch.nn activation module (e.g. SiLU, ReLU, GELU)."""
    cls = getattr(nn, name, None) if isinstance(name, str) else None
    ok = isinstance(cls, type) and issubclass(cls, nn.Module)
    if ok:
        try:
            cls()  # activations construct without arguments; Linear etc. do not
        except TypeError:
            ok = False
    if not ok:
        raise ModelConfigError(
            f"{where}: activation {name!r} is not a torch.nn activation (e.g. SiLU, ReLU, GELU)"
        )
    return name


def check_norm(name: Any, where: str) -> str | None:
    """Return the normalisation layer name: LayerNorm or None."""
    if name not in (None, "LayerNorm"):
        raise ModelConfigError(f"{where}: norm must be LayerNorm or null, got {name!r}")
    return name


def dense_settings(cfg: Any, where: str) -> dict[str, Any]:
    """Validated settings of a dense network node (hidden_layers, activation, norm, dropout)."""
    out = take(cfg, where, DENSE_KEYS)
    return check_dense_values(out, where)


def check_dense_values(out: dict[str, Any], where: str) -> dict[str, Any]:
    """Check the values of the dense keys inside an already taken node."""
    layers = out["hidden_layers"]
    if not isinstance(layers, list | tuple) or not all(
        isinstance(n, int) and n > 0 for n in layers
    ):
        raise ModelConfigError(
            f"{where}.hidden_layers must be a list of positive ints, got {layers!r}"
        )
    out["hidden_layers"] = list(layers)
    out["activation"] = check_activation(out["activation"], f"{where}.activation")
    out["norm"] = check_norm(out["norm"], f"{where}.norm")
    out["dropout"] = number(out["dropout"], f"{where}.dropout", 0.0, 1.0)
    return out


def number(value: Any, where: str, low: float = 0.0, high: float = float("inf")) -> float:
    """Return `value` as a float in [low, high)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value < high:
        raise ModelConfigError(f"{where} must be a number in [{low}, {high}), got {value!r}")
    return float(value)


def variables(model_cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """Validated input variable lists by input type; empty lists are dropped."""
    where = "model.variables"
    raw = model_cfg.get("variables") if isinstance(model_cfg, Mapping) else None
    if not isinstance(raw, Mapping):
        raise ModelConfigError(f"{where} must map input types {list(INPUT_TYPES)} to lists")
    out: dict[str, list[str]] = {}
    for input_type, names in raw.items():
        if input_type not in INPUT_TYPES:
            raise ModelConfigError(
                f"{where}: unknown input type {input_type!r}; allowed are {list(INPUT_TYPES)}"
            )
        names = [] if names is None else names
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise ModelConfigError(f"{where}.{input_type} must be a list of variable names")
        duplicates = sorted({n for n in names if list(names).count(n) > 1})
        if duplicates:
            raise ModelConfigError(f"{where}.{input_type}: duplicated variable(s) {duplicates}")
        if names:
            out[input_type] = list(names)
    if "tracks" not in out:
        raise ModelConfigError(f"{where}.tracks must list at least one track variable")
    return out


def label_map(raw: Any, where: str, num_classes: int) -> dict[int, int] | None:
    """Validated label map {file label: class index} covering classes 0..num_classes-1.

    A target of -1 marks file labels that are read but ignored by the loss.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ModelConfigError(f"{where}.label_map must be a non-empty mapping, got {raw!r}")
    try:
        mapping = {int(k): int(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ModelConfigError(f"{where}.label_map must map ints to ints, got {raw!r}") from None
    classes = sorted(set(mapping.values()) - {-1})
    if classes != list(range(num_classes)):
        raise ModelConfigError(
            f"{where}.label_map values {sorted(set(mapping.values()))} must be exactly the "
            f"class indices 0..{num_classes - 1} of class_names ({num_classes} classes), "
            f"or -1 for labels the loss ignores"
        )
    return mapping


def task_settings(name: str, cfg: Any) -> dict[str, Any]:
    """Validated settings of one task node `model.tasks.<name>`."""
    where = f"model.tasks.{name}"
    if not name.isidentifier() or name == "loss":
        raise ModelConfigError(
            f"{where}: task names must be identifiers and not 'loss' (the total loss key)"
        )
    out = take_typed(cfg, where, TASK_COMMON_KEYS, TASK_TYPE_KEYS, ignore_other_types=False)
    check_dense_values(out, where)
    kind = out["type"]
    out["weight"] = number(out["weight"], f"{where}.weight")
    if out["input"] not in TASK_INPUTS[kind]:
        raise ModelConfigError(
            f"{where}.input: a {kind} task takes input {' or '.join(TASK_INPUTS[kind])}, "
            f"got {out['input']!r}"
        )
    if out["context"] and out["input"] != "tracks":
        raise ModelConfigError(
            f"{where}.context: only track tasks take the pooled jet vector as context"
        )
    if not isinstance(out["label"], str):
        raise ModelConfigError(f"{where}.label must be a variable name, got {out['label']!r}")
    if kind == "classification":
        names = out["class_names"]
        if not isinstance(names, list | tuple) or len(names) < 2:
            raise ModelConfigError(f"{where}.class_names must list at least 2 classes")
        out["class_names"] = [str(n) for n in names]
        out["label_map"] = label_map(out["label_map"], where, len(names))
    if kind == "vertexing":
        if out["origin_label"] is not None and not isinstance(out["origin_label"], str):
            raise ModelConfigError(
                f"{where}.origin_label must be a variable name or null, got {out['origin_label']!r}"
            )
        if out["reduction"] not in VERTEXING_REDUCTIONS:
            raise ModelConfigError(
                f"{where}.reduction must be one of {VERTEXING_REDUCTIONS}, got {out['reduction']!r}"
            )
    if kind == "regression" and out["loss"] not in ("mse", "huber"):
        raise ModelConfigError(f"{where}.loss must be mse or huber, got {out['loss']!r}")
    return out


def tasks(model_cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Validated settings of all tasks, in config order."""
    raw = model_cfg.get("tasks")
    if not isinstance(raw, Mapping) or not raw:
        raise ModelConfigError("model.tasks must map task names to task settings")
    return {str(name): task_settings(str(name), cfg) for name, cfg in raw.items()}


def positive_int(value: Any, where: str, allow_none: bool = False) -> int | None:
    """Return `value` if it is a positive int (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelConfigError(f"{where} must be a positive int, got {value!r}")
    return value


def non_negative_int(value: Any, where: str) -> int:
    """Return `value` if it is an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelConfigError(f"{where} must be an int >= 0, got {value!r}")
    return value


def boolean(value: Any, where: str) -> bool:
    """Return `value` if it is true or false."""
    if not isinstance(value, bool):
        raise ModelConfigError(f"{where} must be true or false, got {value!r}")
    return value
