"""Fine-tuning (the `finetune` node): a new run that starts from another run's weights, some of
them loaded, excluded or frozen (weaver's --load-model-weights / --exclude-model-weights).

Unlike resuming (`resume=`, `ckpt_path=`: the same run continued exactly, with its optimizer,
schedule, counters and data position), only weights come over; the optimizer, schedule and
epochs start anew. Parameters are named as the tagger names them: `init_nets.` (one per object
type: `init_nets.tracks.`), `encoder.`, `pooling.`, `tasks.<name>.`; a prefix selects a
whole submodule (`encoder.layers.0` is not `encoder.layers.01`). A fine-tuning run that is
resumed continues from its own checkpoint: the source weights are not loaded again over it,
while `freeze` still holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from salt.errors import CheckpointError, ConfigError
from salt.training import checkpoint as ckpt
from salt.training.monitor import best_checkpoint_of
from salt.utils.names import did_you_mean

log = logging.getLogger("salt")

PREFIX_KEYS = ("load", "exclude", "freeze")


@dataclass
class FinetuneConfig:
    """The `finetune` node."""

    ckpt_path: str | None = None  # a checkpoint, or a run directory (its best checkpoint)
    load: list[str] = field(default_factory=list)  # prefixes to load ([]: every one that fits)
    exclude: list[str] = field(default_factory=list)  # prefixes not to load (new random ones)
    freeze: list[str] = field(default_factory=list)  # prefixes not trained (requires_grad off)

    def check(self, where: str) -> None:
        for key in PREFIX_KEYS:
            prefixes = [str(p).strip(".") for p in getattr(self, key)]
            if any(not p for p in prefixes):
                raise ConfigError(f"{where}.{key}: a prefix is empty; expected e.g. encoder")
            setattr(self, key, prefixes)
            if prefixes and not self.ckpt_path:
                raise ConfigError(
                    f"{where}.{key} needs {where}.ckpt_path: the checkpoint or run directory "
                    "whose weights the run starts from"
                )


def matches(name: str, prefix: str) -> bool:
    """Whether parameter `name` lies in the submodule `prefix` (or is it)."""
    return name == prefix or name.startswith(prefix + ".")


def module_of(name: str) -> str:
    """The submodule a parameter belongs to, as a user excludes or freezes it: `tasks.<name>`
    for a task head, else the top level (`init_nets`, `encoder`, `pooling`)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "tasks" else parts[0]


def _prefixes(names: Iterable[str]) -> list[str]:
    """Every submodule path above the names, and the names: what a prefix may be."""
    found: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            found[".".join(parts[:i])] = None
    return list(found)


def _check_prefixes(key: str, prefixes: list[str], names: list[str], where: str) -> None:
    for prefix in prefixes:
        if not any(matches(n, prefix) for n in names):
            tops = sorted({module_of(n) for n in names})
            raise ConfigError(
                f"finetune.{key}: {prefix!r} names no parameter of {where}"
                f"{did_you_mean(prefix, _prefixes(names))} Its submodules: {', '.join(tops)}."
            )


def _groups(names: Iterable[str]) -> str:
    """`encoder, tasks.jet_classification` for a set of parameter names."""
    return ", ".join(sorted({module_of(n) for n in names}))


def resolve_source(path: str) -> Path:
    """`finetune.ckpt_path` as a checkpoint file: a run directory gives its best checkpoint
    (by the metric it monitored, as salt.evaluate takes)."""
    source = Path(path)
    if source.is_dir():
        best = best_checkpoint_of(source) if (source / "ckpts").is_dir() else None
        if best is None:
            raise CheckpointError(
                f"finetune.ckpt_path={source}: no epoch checkpoint in {source / 'ckpts'}; "
                "expected a run directory with one, or a checkpoint file (e.g. its "
                "ckpts/last.ckpt)"
            )
        return best
    if not source.exists():
        raise CheckpointError(
            f"finetune.ckpt_path={source}: no such checkpoint file or run directory"
        )
    return source


@dataclass
class Finetuned:
    """What fine-tuning did to the tagger: the summary line and metadata.yaml's record."""

    source: str  # finetune.ckpt_path as configured
    checkpoint: Path | None  # the file the weights came from (None: a resumed run's own)
    epoch: int | None = None  # of the source checkpoint
    step: int | None = None
    loaded: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # under finetune.exclude
    unselected: list[str] = field(default_factory=list)  # outside finetune.load
    absent: list[str] = field(default_factory=list)  # the model's, not in the checkpoint
    unused: list[str] = field(default_factory=list)  # the checkpoint's, not in the model
    frozen: list[str] = field(default_factory=list)
    frozen_numel: int = 0

    def summary(self) -> str:
        frozen = (
            f"frozen {len(self.frozen)} ({_groups(self.frozen)}; {self.frozen_numel:,} parameters)"
            if self.frozen
            else "frozen none"
        )
        if self.checkpoint is None:
            return (
                f"salt: fine-tuning run resumed: its checkpoint holds the weights it started "
                f"from finetune.ckpt_path={self.source} (not loaded again); {frozen}"
            )
        new = [
            f"{len(names)} {why} ({_groups(names)})"
            for names, why in (
                (self.excluded, "excluded"),
                (self.unselected, "outside finetune.load"),
                (self.absent, "not in the checkpoint"),
            )
            if names
        ]
        new_text = ", ".join(new) or "none"
        total = len(self.loaded) + len(self.new)
        return (
            f"salt: fine-tuning from {self.checkpoint} (epoch {self.epoch}, step {self.step}): "
            f"loaded {len(self.loaded)} of {total} tensors; newly initialised: {new_text}; "
            f"{frozen}; checkpoint tensors unused: {len(self.unused)}"
        )

    @property
    def new(self) -> list[str]:
        """The model's tensors that keep their fresh initial values."""
        return self.excluded + self.unselected + self.absent

    def metadata(self, cfg: FinetuneConfig) -> dict[str, Any]:
        return {
            "ckpt_path": self.source,
            "checkpoint": str(self.checkpoint.resolve()) if self.checkpoint else None,
            "weights_loaded": self.checkpoint is not None,  # false: resumed, in its checkpoint
            "epoch": self.epoch,
            "step": self.step,
            "load": list(cfg.load),
            "exclude": list(cfg.exclude),
            "freeze": list(cfg.freeze),
            "loaded_tensors": len(self.loaded),
            "new_tensors": sorted(self.new),
            "frozen_tensors": len(self.frozen),
            "frozen_parameters": self.frozen_numel,
        }


def finetune(
    tagger: nn.Module, cfg: FinetuneConfig, device: torch.device, load: bool = True
) -> Finetuned | None:
    """Load and freeze as `cfg` says (None without `finetune.ckpt_path`). `load=False` for a
    resumed run: its own checkpoint holds the weights; only `freeze` applies again (the
    optimizer must leave out the same parameters as before)."""
    if not cfg.ckpt_path:
        return None
    names = list(tagger.state_dict())
    _check_prefixes("load", cfg.load, names, "the model")
    _check_prefixes("exclude", cfg.exclude, names, "the model")
    _check_prefixes("freeze", cfg.freeze, [n for n, _ in tagger.named_parameters()], "the model")
    result = Finetuned(cfg.ckpt_path, None)
    if load:
        result = load_weights(tagger, cfg, device)
    result.frozen, result.frozen_numel = freeze(tagger, cfg.freeze)
    if not any(p.requires_grad for p in tagger.parameters()):
        raise ConfigError(
            f"finetune.freeze={cfg.freeze} freezes every parameter: nothing would train"
        )
    frozen_new = [n for n in result.frozen if n in result.new]
    if frozen_new:
        log.warning(
            "salt: finetune.freeze freezes %d newly initialised tensors (%s): they keep their "
            "random initial values",
            len(frozen_new),
            _groups(frozen_new),
        )
    return result


def load_weights(tagger: nn.Module, cfg: FinetuneConfig, device: torch.device) -> Finetuned:
    """Copy the selected tensors of the source checkpoint into `tagger`."""
    path = resolve_source(str(cfg.ckpt_path))
    state = ckpt.load_checkpoint(path, map_location=device)
    source: Mapping[str, Tensor] = state.get("model") or {}
    counters = state.get("counters") or {}
    result = Finetuned(str(cfg.ckpt_path), path, counters.get("epoch"), counters.get("step"))
    own = tagger.state_dict()
    _check_prefixes("load", cfg.load, list(source), f"checkpoint {path}")
    selected = [n for n in own if not cfg.load or any(matches(n, p) for p in cfg.load)]
    result.unselected = [n for n in own if n not in selected]
    result.excluded = [n for n in selected if any(matches(n, p) for p in cfg.exclude)]
    wanted = [n for n in selected if n not in result.excluded]
    result.absent = [n for n in wanted if n not in source]
    result.loaded = [n for n in wanted if n in source]
    result.unused = [n for n in source if n not in own]
    check_shapes(result.loaded, source, own, path)
    tagger.load_state_dict({n: source[n] for n in result.loaded}, strict=False)
    return result


def check_shapes(
    names: list[str], source: Mapping[str, Tensor], own: Mapping[str, Tensor], path: Path
) -> None:
    """Every tensor to load has the model's shape; else name the first and what to exclude."""
    wrong = [n for n in names if tuple(source[n].shape) != tuple(own[n].shape)]
    if not wrong:
        return
    first = wrong[0]
    n = len(wrong) - 1
    more = f" (and {n} more tensor{'s' if n > 1 else ''})" if n else ""
    raise ConfigError(
        f"finetune: {first} has shape {list(source[first].shape)} in {path} and "
        f"{list(own[first].shape)} in the model{more}; train it anew instead: "
        f"finetune.exclude=[{_groups(wrong).replace(' ', '')}]"
    )


def freeze(tagger: nn.Module, prefixes: list[str]) -> tuple[list[str], int]:
    """requires_grad off for the parameters under `prefixes` (the optimizer then leaves them
    out: they stay bit for bit as loaded); returns their names and element count."""
    frozen, numel = [], 0
    for name, param in tagger.named_parameters():
        if any(matches(name, p) for p in prefixes):
            param.requires_grad_(False)
            frozen.append(name)
            numel += param.numel()
    return frozen, numel
