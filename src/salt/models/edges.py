"""Edge features between the objects of a jet, as a bias of the encoder's attention logits
(`model.edges`; Particle Transformer's interaction features, Qu, Li, Qian 2022).

For every ordered pair (i, j) of objects, from their raw (unnormalised) kinematics, the old
tool's edge features (salt-ml's `edge_features.py`, same names, the file's units: MeV):

- `dR`: ln dR, dR = sqrt(deta^2 + dphi^2) with dphi wrapped into [-pi, pi);
- `kt`: ln(min(pt_i, pt_j) dR);
- `z`: ln(min(pt_i, pt_j) / (pt_i + pt_j));
- `mass`: ln m = 1/2 ln max(m^2, 1e-8), m^2 = (E_i + E_j)^2 - |p_i + p_j|^2 with
  p = (pt cos phi, pt sin phi, pt sinh eta): the old tool's ln m and clamp, ParT's ln m^2 up to
  the factor 1/2. One difference: an object with m/E below 1% counts as massless (its own
  m^2 is float32 rounding noise there, which the log would turn into any value: see
  `pair_features`).

A small MLP, applied to each pair alone and shared over pairs (ParT's pointwise pair
embedding), maps them to one number per attention head: `bias[b, h, i, j]`, added to the
logits of query i and key j in every encoder layer (ParT's particle attention blocks;
`every_layer: false`: the first layer only).

Which pairs get what:

- not finite -> 0, as the old tool's `nan_to_num`: ln dR and ln kt of two objects in the same
  direction (dR = 0), ln z of two objects without pt. Self pairs (i == i) are such pairs: ln dR
  = ln kt = 0, ln z = ln 1/2, ln m = the object's own ln(2 m). They take part in the attention
  as every pair does and get the bias the MLP gives them. In a jet dR stays below about 1, so
  ln dR = 0 does not stand for a real pair's value.
- objects of a type without kinematics (not in `kinematics`), the encoder's registers and
  padded slots: every pair they are in gets bias 0, exactly (not the MLP's value of zero
  features); padded keys stay excluded from the attention (their logit is -inf).
- pairs across types (a track with a flow) are pairs like any other: each type gives every
  quantity the features need (`EdgeConfig.check`), so every pair of two types in `kinematics`
  has all the features.

The raw kinematics are the model's normalised inputs un-normalised with the norm_dict's means
and stds (`EdgeInputs`, buffers set when the tagger is built; the ONNX graph normalises its raw
inputs with the same numbers in front of the tagger, so it computes the same).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from salt.errors import ModelConfigError
from salt.models.dense import Dense, DenseConfig
from salt.models.packing import Packing
from salt.utils.input_types import is_object_type, object_types
from salt.utils.names import did_you_mean


class EdgeFeature(enum.StrEnum):
    """A pair feature (the old tool's names)."""

    dR = "dR"
    kt = "kt"
    z = "z"
    mass = "mass"


KINEMATICS = ("pt", "eta", "phi", "energy")  # the columns of `EdgeInputs`' output, in order
# what each feature is computed from
NEEDS: dict[EdgeFeature, tuple[str, ...]] = {
    EdgeFeature.dR: ("eta", "phi"),
    EdgeFeature.kt: ("pt", "eta", "phi"),
    EdgeFeature.z: ("pt",),
    EdgeFeature.mass: ("pt", "eta", "phi", "energy"),
}
MIN_MASS2 = 1e-8  # the old tool's clamp of m^2 before its log
# (E - |p|) / E below which an object counts as massless: m/E < 1% (m^2/E^2 < 1e-4)
MASSLESS = 5e-5
EDGE_COLUMNS = len(KINEMATICS) + 1  # the kinematics and a 1 where the object has them
# (input type, variables) -> (mean, 1/std) as the loader normalises them (salt.data.ftag's
# `input_norm`: the model layer reads no norm_dict itself)
InputNorm = Callable[[str, Sequence[str]], tuple[np.ndarray, np.ndarray]]


@dataclass
class EdgeConfig(DenseConfig):
    """`model.edges` (no `features`: no edge features; a node, not null, so a command line can
    switch them on key by key). The pair MLP's settings are a `DenseConfig`'s
    (`hidden_layers`, `activation`, `norm` after each hidden layer, `dropout`); its input size
    is the number of features, its output size the number of attention heads."""

    features: list[EdgeFeature] = field(default_factory=list)  # []: off
    # object type -> its kinematic variables; types not listed get no bias
    # object type -> which of its input variables hold pt, eta (or deta to the jet axis: see
    # jet_eta), phi (or dphi) and energy; a quantity left out: features needing it cannot be
    # chosen. Plain mappings, checked here: a typed node could not take a new type from the
    # command line (+model.edges.kinematics.flows={pt: pt, ...})
    kinematics: dict[str, dict[str, str | None]] = field(default_factory=dict)
    # a jets variable with the jet's eta, when the kinematics' eta are deta to the jet axis
    # (object eta - jet eta, as FTAG's deta): the mass needs the absolute eta (p_z); dR, kt and
    # z only differences. null: the eta given are absolute.
    jet_eta: str | None = None
    every_layer: bool = True  # the bias in every encoder layer (ParT), else the first only
    hidden_layers: list[int] = field(default_factory=lambda: [64, 64, 64])  # ParT's
    activation: str = "GELU"  # ParT's

    @property
    def enabled(self) -> bool:
        return bool(self.features)

    def check(self, where: str, variables: Mapping[str, Sequence[str]] | None = None) -> None:
        """The settings; with the model's `variables`, that each name is one of its inputs and
        each type gives what the features need."""
        super().check(where)
        if not self.features:
            if self.kinematics:
                raise ModelConfigError(
                    f"{where}.features is empty (edges off) but {where}.kinematics is set; "
                    f"choose features from {[str(f) for f in EdgeFeature]}"
                )
            return  # off

        doubled = sorted({str(f) for f in self.features if self.features.count(f) > 1})
        if doubled:
            raise ModelConfigError(f"{where}.features: duplicated feature(s) {doubled}")
        if not self.kinematics:
            raise ModelConfigError(
                f"{where}.kinematics: name the kinematic variables of at least one object type "
                "(e.g. flows: {pt: pt, eta: deta, phi: dphi, energy: energy})"
            )
        if variables is None:
            return
        needed = sorted({q for f in self.features for q in NEEDS[EdgeFeature(f)]})
        for input_type, kin in self.kinematics.items():
            at = f"{where}.kinematics.{input_type}"
            if not is_object_type(input_type) or input_type not in variables:
                types = object_types(variables)
                raise ModelConfigError(
                    f"{at}: {input_type!r} is not an object type of the model; its object types "
                    f"are {types}"
                )
            for key in kin:
                if key not in KINEMATICS:
                    raise ModelConfigError(
                        f"{at}.{key}: unknown key{did_you_mean(str(key), list(KINEMATICS))} "
                        f"Its keys: {', '.join(KINEMATICS)}."
                    )
            for quantity in KINEMATICS:
                name = kin.get(quantity)
                if name is None:
                    if quantity in needed:
                        users = [str(f) for f in self.features if quantity in NEEDS[f]]
                        raise ModelConfigError(
                            f"{at}.{quantity}: not set, but the feature(s) {users} need the "
                            f"{quantity} of every type in {where}.kinematics; name the "
                            f"{input_type} variable holding it, or leave {input_type} out of "
                            f"{where}.kinematics (its pairs then get no bias)"
                        )
                elif name not in variables[input_type]:
                    raise ModelConfigError(
                        f"{at}.{quantity}: {name!r} is not one of model.variables.{input_type} "
                        f"{list(variables[input_type])}"
                    )
        if self.jet_eta is not None and self.jet_eta not in variables.get("jets", []):
            raise ModelConfigError(
                f"{where}.jet_eta: {self.jet_eta!r} is not one of model.variables.jets "
                f"{list(variables.get('jets', []))}"
            )


def _log(x: Tensor) -> Tensor:
    """ln x where it is finite, else 0; no inf or NaN in the value or its gradient."""
    ok = (x > 0) & (x < math.inf)
    return torch.where(ok, torch.log(torch.where(ok, x, torch.ones_like(x))), torch.zeros_like(x))


def _cosh(x: Tensor) -> Tensor:
    """cosh from exp: torch's ONNX exporter has no cosh."""
    return (torch.exp(x) + torch.exp(-x)) / 2


def _sinh(x: Tensor) -> Tensor:
    """sinh from exp (ONNX, as `_cosh`); below |x| = 0.1 its series (to x^5, relative error
    < 2e-10), where exp(x) - exp(-x) would lose the digits of a small x."""
    small = x.abs() < 0.1
    x2 = x.square()
    series = x * (1 + x2 / 6 * (1 + x2 / 20))
    return torch.where(small, series, (torch.exp(x) - torch.exp(-x)) / 2)


def wrap_phi(dphi: Tensor) -> Tensor:
    """An angle difference in [-pi, pi). (The old tool subtracts 2 pi only above pi, which
    leaves dphi < -pi, e.g. phi_i = 3.1 and phi_j = -3.1, unwrapped in one of the two pair
    orders.)"""
    return torch.remainder(dphi + math.pi, 2 * math.pi) - math.pi


def pair_features(kin: Tensor, features: Sequence[str]) -> Tensor:
    """The edge features `[..., n, n, F]` of every ordered pair (i, j) of `kin[..., n, 4]`
    (raw pt, eta, phi, energy; a column no feature needs may hold anything), in the order of
    `features`; non-finite values are 0 (see the module docstring).

    The mass from m^2 = m_i^2 + m_j^2 + 2 (E_i E_j - p_i.p_j), written with d = E - |p| per
    object (|p| = pt cosh eta) and the pair's angles:
    m^2 = d_i (E_i + |p_i|) + d_j (E_j + |p_j|) + 2 (E_i d_j + |p_j| d_i)
    + 4 pt_i pt_j (sinh^2(deta / 2) + sin^2(dphi / 2)),
    the old tool's (E_i + E_j)^2 - |p_i + p_j|^2 without subtracting numbers of size E^2. Float32
    inputs (and their normalisation) resolve d only to about 1e-6 E: a smaller d is noise,
    which ln m of a self pair or a collinear pair would turn into anything from -9 to 10, and
    differently in every implementation of cosh (torch, onnxruntime). So d below `MASSLESS` E
    counts as 0 (m/E < 1%: a pion above 14 GeV): the pair term then has no cancellation left,
    and the features are the same function of the inputs everywhere.
    """
    pt, eta, phi, energy = kin.unbind(-1)

    def i(x: Tensor) -> Tensor:  # the pair's first object (the query), along rows
        return x.unsqueeze(-1)

    def j(x: Tensor) -> Tensor:  # the second (the key), along columns
        return x.unsqueeze(-2)

    deta = j(eta) - i(eta)
    dphi = wrap_phi(j(phi) - i(phi))
    delta_r = torch.sqrt(deta.square() + dphi.square())
    pt_min = torch.minimum(i(pt), j(pt))
    out = []
    for feature in features:
        if feature == EdgeFeature.dR:
            value = _log(delta_r)
        elif feature == EdgeFeature.kt:
            value = _log(pt_min * delta_r)
        elif feature == EdgeFeature.z:
            value = _log(pt_min / (i(pt) + j(pt)))
        elif feature == EdgeFeature.mass:
            momentum = pt * _cosh(eta)
            d = energy - momentum
            d = torch.where(d > MASSLESS * energy, d, torch.zeros_like(d))  # see the docstring
            own = d * (energy + momentum)  # m^2 of each object
            angles = _sinh(deta / 2).square() + torch.sin(dphi / 2).square()
            mass2 = (
                i(own)
                + j(own)
                + 2 * (i(energy) * j(d) + j(momentum) * i(d))
                + 4 * i(pt) * j(pt) * angles
            )
            value = 0.5 * _log(mass2.clamp_min(MIN_MASS2))
        else:
            raise ValueError(f"unknown edge feature {feature!r}; choose from {list(EdgeFeature)}")
        out.append(value)
    return torch.stack(out, dim=-1)


class EdgeInputs(nn.Module):
    """The raw kinematics of every object, from the model's normalised inputs.

    `forward` gives, per object type, `[B, T, EDGE_COLUMNS]`: pt, eta, phi, energy (0 where a
    quantity is not named) and a last column 1 for the types in `kinematics`, 0 for the others
    (all zero). Un-normalised as `x / inv_std + mean` with the norm_dict's numbers (float32, as
    the loader normalises `(x - mean) * inv_std`, `norm`): buffers, not saved with the weights
    (the run's norm_dict, which its loader and ONNX graph use, is the one source). Without
    `norm` the forward refuses to run (such a tagger's weights are still of use, e.g. to save a
    checkpoint).
    """

    def __init__(
        self,
        variables: Mapping[str, Sequence[str]],
        config: EdgeConfig,
        norm: InputNorm | None,
    ) -> None:
        super().__init__()
        self.ready = norm is not None
        # per type: the input column of each quantity (None: not given)
        self.columns: dict[str, list[int | None]] = {}
        for input_type, kin in config.kinematics.items():
            names = [kin.get(q) for q in KINEMATICS]
            self.columns[input_type] = [
                None if n is None else list(variables[input_type]).index(n) for n in names
            ]
            given = [n for n in names if n is not None]
            self._norm_buffers(input_type, given, norm)
        self.jet_eta = None
        if config.jet_eta is not None:
            self.jet_eta = list(variables["jets"]).index(config.jet_eta)
            self._norm_buffers("jets", [config.jet_eta], norm)

    def _norm_buffers(self, input_type: str, names: Sequence[str], norm: InputNorm | None) -> None:
        if norm is None:
            mean, inv_std = torch.zeros(len(names)), torch.ones(len(names))
        else:
            mean, inv_std = (
                torch.as_tensor(a, dtype=torch.float32) for a in norm(input_type, names)
            )
        self.register_buffer(f"mean_{input_type}", mean, persistent=False)
        self.register_buffer(f"inv_std_{input_type}", inv_std, persistent=False)

    def _raw(self, x: Tensor, input_type: str) -> list[Tensor]:
        """The named columns of `x[..., F]` un-normalised, in KINEMATICS order."""
        mean = getattr(self, f"mean_{input_type}").to(x.dtype)
        inv_std = getattr(self, f"inv_std_{input_type}").to(x.dtype)
        out, k = [], 0
        for col in self.columns[input_type]:
            if col is None:
                out.append(torch.zeros_like(x[..., 0]))
                continue
            out.append(x[..., col] / inv_std[k] + mean[k])
            k += 1
        return out

    def forward(self, objects: Mapping[str, Tensor], jets: Tensor | None) -> dict[str, Tensor]:
        """`[B, T, EDGE_COLUMNS]` per object type of `objects` (`[B, T, F]`, normalised)."""
        if not self.ready:
            raise RuntimeError(
                "this tagger has model.edges but was built without the normalisation of its "
                "inputs (build_tagger(..., input_norm=salt.data.ftag.input_norm(norm_dict, "
                "input_map))): its edge features need the raw kinematics"
            )
        jet_eta = None
        if self.jet_eta is not None:
            assert jets is not None  # EdgeConfig.check: jet_eta is a jets variable
            mean, inv_std = self.mean_jets.to(jets.dtype), self.inv_std_jets.to(jets.dtype)
            jet_eta = jets[:, self.jet_eta] / inv_std[0] + mean[0]
        out = {}
        for input_type, x in objects.items():
            if input_type not in self.columns:
                out[input_type] = x.new_zeros(*x.shape[:-1], EDGE_COLUMNS)
                continue
            pt, eta, phi, energy = self._raw(x, input_type)
            if jet_eta is not None:
                eta = eta + jet_eta.reshape(-1, *([1] * (eta.dim() - 1)))
            out[input_type] = torch.stack([pt, eta, phi, energy, torch.ones_like(pt)], dim=-1)
        return out


class EdgeBias(nn.Module):
    """Pair features -> one attention bias per head (`net`: the pair MLP), zero on every pair
    with an object without kinematics (`EdgeInputs`' last column 0)."""

    def __init__(
        self,
        features: Sequence[str],
        num_heads: int,
        every_layer: bool = True,
        **dense: object,
    ) -> None:
        super().__init__()
        self.features = [EdgeFeature(f) for f in features]
        self.every_layer = bool(every_layer)
        self.net = Dense(len(self.features), num_heads, **dense)  # type: ignore[arg-type]

    def _bias(self, edges: Tensor, real: Tensor) -> Tensor:
        """`edges[B, n, EDGE_COLUMNS]`, `real[B, n]` (True: a real object with kinematics)
        -> `[B, heads, n, n]`."""
        values = self.net(pair_features(edges[..., : len(KINEMATICS)], self.features))
        pair = real.unsqueeze(-1) & real.unsqueeze(-2)
        # permute, not movedim: onnxruntime refuses the negative axes movedim exports
        return values.masked_fill(~pair.unsqueeze(-1), 0.0).permute(0, 3, 1, 2)

    def padded(self, edges: Tensor, pad_mask: Tensor) -> Tensor:
        """The bias `[B, heads, T, T]` of `edges[B, T, EDGE_COLUMNS]` (pad_mask True: padded)."""
        return self._bias(edges, (edges[..., -1] > 0) & ~pad_mask)

    def packed(self, edges: Tensor, packing: Packing) -> list[Tensor]:
        """The bias of packed rows `edges[N, EDGE_COLUMNS]`: `[jets, heads, n, n]` per block of
        `packing` (every row real)."""
        return [self._bias(block, block[..., -1] > 0) for block in packing.split(edges)]
