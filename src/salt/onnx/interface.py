"""The interface of ATLAS's flavour-tagging inference (Athena's FlavorTagInference), as the old
tool (salt-ml) writes it: input, output and metadata names of an exported tagger.

Learned from salt-ml's ``salt/onnx/to_onnx.py`` and ``task.py`` (never copied); Athena's loader
finds the inputs, the track selection and the outputs by these names alone, so a model exported
here replaces one exported there without a change downstream:

- inputs, one jet at a time: ``jet_features`` ``[1, n_jet_vars]`` and, per object type,
  ``<type without the s>_features`` ``[n_<type>, n_vars]`` (``track_features [n_tracks, 19]``),
  raw values (the normalisation is in the graph), no mask (every row is a real object);
- outputs: ``<model>_<px>`` float scalars of the jet classification (``GN2_pb``, ``_pc``,
  ``_pu``, ``_ptau``; ftag's names for its flavours), ``<model>_<target>`` for jet regression
  (in the target's units; ``<model>_<target>_stddev`` for a Gaussian task's width), then per
  track ``<model>_TrackOrigin``, ``<model>_TrackType`` (int8 class) and ``<model>_VertexIndex``
  (int8 group);
- metadata: one ``gnn_config`` JSON (its ``inputs``, ``input_sequences`` and ``output_names``
  are what Athena reads) and the model name as the graph's doc string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from salt.errors import ConfigError

GLOBAL_OBJECT = "jets"
# Athena's track selections (TracksLoader.cxx); the name only labels the input sequence
TRACK_SELECTIONS = (
    "all",
    "ip3d",
    "dipsLoose202102",
    "r22default",
    "r22loose",
    "dipsTightUpgrade",
    "dipsLooseUpgrade",
)
DEFAULT_TRACK_SELECTION = "r22default"
# per-track outputs by task name, as Athena decorates tracks; another track classification
# task gets its name in CamelCase
TRACK_OUTPUTS = {"track_origin": "TrackOrigin", "track_type": "TrackType"}
VERTEX_OUTPUT = "VertexIndex"
ONNX_MODEL_VERSION = "v1"
# jet variables carry the calibration in their FTAG names; Athena's jet inputs do not
JET_SUFFIX = "_btagJes"


@dataclass(frozen=True)
class Feature:
    """One graph input: ``salt`` type -> Athena's input (``athena_in``) and tensor names."""

    salt: str  # the object type in salt (jets, tracks, ...)
    onnx: str  # the graph input: jet_features, track_features, ...
    athena_in: str  # the name in the metadata: jet_var, tracks_r22default_sd0sort, ...
    axis: str | None  # the dynamic object axis (n_tracks); None for the jet


def feature_map(object_types: Sequence[str], track_selection: str) -> list[Feature]:
    """The jet input, then one input per object type, named as Athena expects."""
    check_track_selection(track_selection)
    features = [Feature(GLOBAL_OBJECT, "jet_features", "jet_var", None)]
    for name in object_types:
        base = name.split("_")[0]
        if base in ("tracks", "flows", "flow"):
            plural = "flows" if base == "flow" else base
            athena_in = f"{plural}_{track_selection}_sd0sort"
        elif base == "electrons":
            athena_in = f"{name}_r22default"
        else:
            athena_in = f"{name}_var"
        singular = base.removesuffix("s")
        features.append(Feature(name, f"{singular}_features", athena_in, f"n_{base}"))
    return features


def check_track_selection(name: str) -> None:
    if name not in TRACK_SELECTIONS:
        raise ConfigError(
            f"track_selection={name}: Athena knows {', '.join(TRACK_SELECTIONS)} "
            "(TracksLoader.cxx); pick the selection the model was trained with."
        )


def check_model_name(name: str, where: str = "name") -> str:
    """Athena splits output names at the first underscore: a model name has none (nor -)."""
    if not name or "_" in name or "-" in name:
        raise ConfigError(
            f"{where}={name!r}: a model name in the outputs (<name>_pb) has no '_' or '-'; "
            f"e.g. name={re.sub(r'[_-]', '', name) or 'GN2'}"
        )
    return name


def default_model_name(model_name: str) -> str:
    """The run's model name as the old tool shortens it: without underscores and dashes."""
    return re.sub(r"[_-]", "", model_name)


def track_output(task_name: str) -> str:
    """``TrackOrigin`` for ``track_origin``; CamelCase of other track task names."""
    return TRACK_OUTPUTS.get(task_name) or "".join(p.capitalize() for p in task_name.split("_"))


@dataclass(frozen=True)
class Combination:
    """A new output: the weighted sum of existing ones (``light,0.5*pu,0.5*pg``)."""

    name: str
    terms: tuple[tuple[float, str], ...]

    def plain(self) -> list:
        return [self.name, [[scale, term] for scale, term in self.terms]]


def parse_combination(spec: str, key: str = "combine_outputs") -> Combination:
    """``new,term,0.5*term`` -> the output ``new`` = the sum of the scaled terms (output names
    without the model prefix, as the old tool's ``--combine_outputs``)."""
    name, *items = [part.strip() for part in str(spec).split(",")]
    if not name or not items:
        raise ConfigError(
            f"{key}: {spec!r} is not <new name>,<term>[,<term>...] with terms like pu or 0.5*pu"
        )
    terms = []
    for item in items:
        scale, _, term = item.rpartition("*")
        try:
            terms.append((float(scale) if scale else 1.0, term))
        except ValueError:
            raise ConfigError(f"{key}: {spec!r}: {item!r} is not <number>*<output>") from None
    return Combination(name, tuple(terms))


def parse_rename(spec: str, key: str = "rename_outputs") -> tuple[str, str]:
    old, sep, new = str(spec).partition(":")
    if not sep or not old or not new or ":" in new:
        raise ConfigError(f"{key}: {spec!r} is not <old>:<new> (e.g. pu:plight)")
    return old, new
