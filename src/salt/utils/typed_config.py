"""Typed configs: reading a config node into its dataclass, and the value checks they share.

Each component owns a dataclass (its schema; `salt.schema` registers them with Hydra), so
OmegaConf rejects unknown keys and wrong types when a config is composed or read. What types
cannot say (ranges, names of torch activations, keys that belong to another `type`) each
dataclass checks in its `check(where)`, with `where` the key path for the message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from salt.errors import ConfigError
from salt.utils.names import did_you_mean


class Checked(Protocol):
    def check(self, where: str) -> None: ...


T = TypeVar("T", bound=Checked)


def read(cls: type[T], node: Any, where: str) -> T:
    """`node` (a mapping, a DictConfig or already a `cls`) as a checked `cls` instance; a
    wrong key, type or value is one `ConfigError` naming the key path under `where`."""
    if isinstance(node, cls):
        obj = node
    else:
        if node is None:
            raise ConfigError(f"{where}: missing (expected a {cls.__name__} mapping)")
        if not isinstance(node, Mapping | DictConfig):
            raise ConfigError(f"{where} must be a mapping, got {node!r}")
        if isinstance(node, DictConfig):
            # as plain values (interpolations kept): keys added with Hydra's `+` are refused
            # like any other unknown key, not carried along unread
            node = OmegaConf.to_container(node)
        try:
            typed = OmegaConf.merge(OmegaConf.structured(cls), node)
            obj = OmegaConf.to_object(typed)  # type: ignore[assignment]
        except OmegaConfBaseException as err:
            found = None if _names_a_value(err, node) else _locate(cls, node, where)
            if found is not None:  # the one value that failed, named by its key path
                raise ConfigError(omegaconf_message(found[1], found[0], own_key=False)) from None
            raise ConfigError(omegaconf_message(err, where)) from None
    obj.check(where)
    return obj


def _names_a_value(err: OmegaConfBaseException, node: Mapping) -> bool:
    """Whether OmegaConf's error names a key of `node` that holds a value (not a mapping):
    then its key is the one to report."""
    value: Any = node
    for part in str(getattr(err, "full_key", "") or "").split("."):
        if not part or not isinstance(value, Mapping):
            return False
        key = next((k for k in value if str(k) == part), None)
        if key is None:
            return False
        value = value[key]
    return not isinstance(value, Mapping)


def _locate(cls: type, node: Mapping, where: str) -> tuple[str, OmegaConfBaseException] | None:
    """The key path under `where` of the value that does not fit `cls`, and OmegaConf's error
    for that value alone: found by merging one key at a time, down through the sub-configs
    (OmegaConf names no key, or its parent's, when a whole sub-config has the wrong type)."""
    hints = typing.get_type_hints(cls)
    base = OmegaConf.structured(cls)  # merged into copies below
    for key, value in node.items():
        try:
            OmegaConf.merge(base, {key: value})
            continue
        except OmegaConfBaseException as err:
            path = ".".join(p for p in (where, str(key)) if p)
            found: tuple[str, OmegaConfBaseException] | None = None
            hint = hints.get(str(key))
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            options = [*typing.get_args(hint)] if union else [hint]  # X, or X | None
            sub = next((t for t in options if dataclasses.is_dataclass(t)), None)
            mapping = next((t for t in options if typing.get_origin(t) is dict), None)
            if isinstance(value, Mapping) and isinstance(sub, type):
                found = _locate(sub, value, path)
            elif isinstance(value, Mapping) and mapping is not None:
                # dict[K, X], e.g. model.tasks, a label_map, data.input_map: the failing entry
                item = typing.get_args(mapping)[1]
                for k, v in value.items():
                    try:
                        OmegaConf.merge(base, {key: {k: v}})
                    except OmegaConfBaseException as entry_err:
                        at = f"{path}.{k}"
                        if dataclasses.is_dataclass(item) and isinstance(v, Mapping):
                            found = _locate(item, v, at)  # type: ignore[arg-type]
                        found = found or (at, entry_err)
                        break
            return found or (path, err)
    return None


def omegaconf_message(err: OmegaConfBaseException, where: str = "", own_key: bool = True) -> str:
    """OmegaConf's error on one line, led by the full key path (``where.key``; ``where`` alone
    without ``own_key``); an unknown key gets the closest valid names, a missing one says so."""
    key = str(getattr(err, "full_key", "") or "") if own_key else ""
    path = ".".join(p for p in (where, key) if p)
    key = key or where  # the key path the closest names are looked for with
    schema = getattr(err, "object_type", None)
    if isinstance(err, ConfigKeyError | ConfigAttributeError) and dataclasses.is_dataclass(schema):
        valid = [f.name for f in dataclasses.fields(schema)]
        name = key.rpartition(".")[2]
        text = f"unknown key{did_you_mean(name, valid)} Valid keys: {', '.join(valid)}."
    elif isinstance(err, MissingMandatoryValue):
        text = "missing: this key has no default and must be set."
    else:
        detail = ("full_key:", "object_type=", "reference_type=", "explicit_type=")
        lines = (s.strip() for s in str(err).splitlines())
        text = " ".join(s for s in lines if s and not s.startswith(detail))
    return f"{path}: {text}" if path else text


def as_plain(obj: Any) -> Any:
    """A dataclass config (or a node) as plain dicts and lists with enums as strings."""
    node = obj if isinstance(obj, DictConfig) else OmegaConf.structured(obj)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


# ---- value checks ---------------------------------------------------------------------------
def positive(value: int | None, where: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{where} must be a positive int, got {value!r}")


def at_least(value: float | None, where: str, low: float) -> None:
    if value is None or value < low:
        raise ConfigError(f"{where} must be >= {low}, got {value!r}")


def fraction(value: float, where: str) -> None:
    """A probability-like value in [0, 1) (dropout rates)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{where} must be a number in [0, 1), got {value!r}")


def one_of(value: Any, where: str, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def activation(name: str, where: str) -> None:
    """`name` names a torch.nn activation module (e.g. SiLU, ReLU, GELU)."""
    from torch import nn  # only here: configs are read before anything else needs torch

    cls = getattr(nn, name, None)
    ok = isinstance(cls, type) and issubclass(cls, nn.Module)
    if ok:
        try:
            cls()  # activations construct without arguments; Linear etc. do not
        except TypeError:
            ok = False
    if not ok:
        raise ConfigError(
            f"{where}: activation {name!r} is not a torch.nn activation (e.g. SiLU, ReLU, GELU)"
        )
