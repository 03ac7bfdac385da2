"""The built-in sample's other objects per jet: particle-flow objects and electrons.

Generated from the jets and tracks `salt.data.sample` made (their truth: flavour, pt, the
decay vertices, the tracks), from a random stream of their own, so adding them left the jets
and tracks bit for bit as they were. Toy physics, with the handles a multi-object tagger uses:

* ``flows``: a charged flow object per track (its momentum and direction) and neutral ones
  (photons from pi0 decays, neutral hadrons) carrying the jet's neutral energy, about 40% of
  it; heavy-flavour decays emit fewer, harder neutrals, tau jets few beyond their pi0s.
* ``electrons``: from semileptonic b and c decays (B -> e, B -> D -> e, D -> e; tau -> e),
  displaced with their parent's flight, hard along the jet (high ``ptfrac``) with ``ptrel`` set
  by the parent's mass, plus fake candidates from hadrons and photon conversions in every
  jet: prompt, with hadron-like shower (E/p below 1, larger ``Rhad``) and TRT (``eProbabilityHT``)
  responses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_FLOW_SLOTS = 50
N_ELECTRON_SLOTS = 4
FLOW_VARIABLES = ["pt", "energy", "deta", "dphi", "isCharged"]
ELECTRON_VARIABLES = [
    "pt",
    "ptfrac",
    "ptrel",
    "dr",
    "abs_eta",
    "qOverP",
    "d0RelativeToBeamspot",
    "d0RelativeToBeamspotSignificance",
    "ftag_ptVarCone30OverPt",
    "eProbabilityHT",
    "ftag_energyOverP",
    "Rhad",
]
FLOW_DTYPE = np.dtype(
    [(name, np.float32) for name in FLOW_VARIABLES[:-1]]
    + [("isCharged", np.bool_), ("valid", np.bool_)]
)
# truth origin of an electron candidate (a label for studies; no default task uses it)
ELECTRON_ORIGINS = ["fake", "fromB", "fromBC", "fromC", "fromTau", "conversion"]
ELECTRON_DTYPE = np.dtype(
    [(name, np.float32) for name in ELECTRON_VARIABLES]
    + [("valid", np.bool_), ("ftagTruthOriginLabel", np.int8)]
)

_B, _C, _LIGHT, _TAU = range(4)
_FAKE_E, _E_FROM_B, _E_FROM_BC, _E_FROM_C, _E_FROM_TAU, _CONVERSION = range(6)
# semileptonic branching fractions to electrons (per decay in the chain)
_BR_B_E, _BR_D_E, _BR_TAU_E = 0.105, 0.09, 0.178
_FAKE_E_RATE, _CONVERSION_RATE = 0.025, 0.008  # per track; per jet (grows with log pt)
_NEUTRAL_FRACTION = 0.4  # of the jet's energy (the tracks carry the sample's 0.6)
_NEUTRAL_MEAN = np.array([4.0, 4.5, 6.0, 1.6])  # neutral objects per flavour at the lowest pt
_NEUTRAL_SHAPE = np.array([1.5, 1.3, 0.9, 2.5])  # harder neutrals from decays and taus
_PTREL_SCALE = {_E_FROM_B: 1.3, _E_FROM_BC: 0.7, _E_FROM_C: 0.6, _E_FROM_TAU: 0.5}
_FLOW_PT_MIN, _ELECTRON_PT_MIN = 0.5, 2.0  # GeV


@dataclass
class JetTruth:
    """What the objects are made from: per jet (GeV, mm) and per real track (in jet order)."""

    flavour: np.ndarray
    pt: np.ndarray
    eta: np.ndarray
    parent_p: np.ndarray  # momentum of the B, D or tau
    flight_xy: np.ndarray  # (x, y) of its decay vertex, jet along x
    cascade_xy: np.ndarray  # (x, y) of the D's decay vertex in a b-jet
    parent_dir: np.ndarray  # (deta, dphi) of its flight direction
    track_jet: np.ndarray  # the jet of each real track
    track_slot: np.ndarray  # its slot in the jet's tracks
    track_origin: np.ndarray  # ftagTruthOriginLabel
    track_charge: np.ndarray  # +-1
    track_pt: np.ndarray
    track_deta: np.ndarray
    track_dphi: np.ndarray


def _place(n_jets: int, jet: np.ndarray, rows: np.ndarray, slots: int, dtype: np.dtype):
    """Padded ``(n_jets, slots)`` records with ``rows`` (sorted by jet) in the first slots; a
    jet's objects beyond ``slots`` are dropped (the hardest are kept: rows come pt-ordered)."""
    out = np.zeros((n_jets, slots), dtype=dtype)
    if "ftagTruthOriginLabel" in dtype.names:
        out["ftagTruthOriginLabel"] = -1
    counts = np.bincount(jet, minlength=n_jets)
    rank = np.arange(jet.size) - (np.cumsum(counts) - counts)[jet]
    keep = rank < slots
    out[jet[keep], rank[keep]] = rows[keep]
    return out


def _pt_order(jet: np.ndarray, pt: np.ndarray) -> np.ndarray:
    """Rows grouped by jet, hardest first (as FTAG dumps order flows)."""
    return np.lexsort((-pt, jet))


def make_flows(rng: np.random.Generator, truth: JetTruth) -> np.ndarray:
    """``(n_jets, N_FLOW_SLOTS)`` flow objects: one charged per track, then the neutrals."""
    n_jets = truth.pt.size
    flavour = truth.flavour
    log_pt = np.log(truth.pt / 20.0)
    n_neutral = rng.poisson(_NEUTRAL_MEAN[flavour] * (1 + 0.5 * log_pt))
    n_neutral = np.maximum(n_neutral, 1)
    jet_n = np.repeat(np.arange(n_jets), n_neutral)
    weight = rng.gamma(_NEUTRAL_SHAPE[flavour[jet_n]])
    total = np.bincount(jet_n, weights=weight, minlength=n_jets)
    pt_n = _NEUTRAL_FRACTION * truth.pt[jet_n] * weight / np.maximum(total[jet_n], 1e-12)
    # neutrals from the heavy decay fly along it, fragmentation ones spread wider when soft
    near_parent = (flavour[jet_n] != _LIGHT) & (rng.random(jet_n.size) < 0.5)
    spread = np.where(near_parent, 0.05, 0.04 + 0.15 / np.sqrt(np.maximum(pt_n, 0.1)))
    centre = np.where(near_parent[:, None], truth.parent_dir[jet_n], 0.0)
    deta_n = np.clip(centre[:, 0] + spread * rng.standard_normal(jet_n.size), -0.6, 0.6)
    dphi_n = np.clip(centre[:, 1] + spread * rng.standard_normal(jet_n.size), -0.6, 0.6)
    keep = pt_n > _FLOW_PT_MIN
    jet_n, pt_n, deta_n, dphi_n = jet_n[keep], pt_n[keep], deta_n[keep], dphi_n[keep]

    jet = np.concatenate([truth.track_jet, jet_n])
    pt = np.concatenate([truth.track_pt, pt_n])
    deta = np.concatenate([truth.track_deta, deta_n])
    dphi = np.concatenate([truth.track_dphi, dphi_n])
    charged = np.arange(jet.size) < truth.track_jet.size
    rows = np.zeros(jet.size, dtype=FLOW_DTYPE)
    rows["pt"] = pt * 1e3  # MeV, as the jets and tracks
    rows["energy"] = pt * np.cosh(truth.eta[jet] + deta) * 1e3
    rows["deta"], rows["dphi"] = deta, dphi
    rows["isCharged"] = charged
    rows["valid"] = True
    order = _pt_order(jet, pt)
    return _place(n_jets, jet[order], rows[order], N_FLOW_SLOTS, FLOW_DTYPE)


def make_electrons(rng: np.random.Generator, truth: JetTruth) -> np.ndarray:
    """``(n_jets, N_ELECTRON_SLOTS)`` electron candidates, real and fake."""
    n_jets = truth.pt.size
    flavour = truth.flavour
    is_b, is_c, is_tau = flavour == _B, flavour == _C, flavour == _TAU
    # real electrons per jet: B -> e and the cascade B -> D -> e, D -> e, tau -> e
    sources = [
        (_E_FROM_B, is_b & (rng.random(n_jets) < _BR_B_E)),
        (_E_FROM_BC, is_b & (rng.random(n_jets) < _BR_D_E)),
        (_E_FROM_C, is_c & (rng.random(n_jets) < _BR_D_E)),
        (_E_FROM_TAU, is_tau & (rng.random(n_jets) < _BR_TAU_E)),
    ]
    n_tracks = np.bincount(truth.track_jet, minlength=n_jets)
    n_fake = rng.poisson(_FAKE_E_RATE * n_tracks)
    n_conv = rng.poisson(_CONVERSION_RATE * (2 + 4 * np.log(truth.pt / 20.0 + 1)))
    jets, origin = [], []
    for code, has in sources:
        jets.append(np.flatnonzero(has))
        origin.append(np.full(int(has.sum()), code))
    for code, count in ((_FAKE_E, n_fake), (_CONVERSION, n_conv)):
        jets.append(np.repeat(np.arange(n_jets), count))
        origin.append(np.full(int(count.sum()), code))
    jet = np.concatenate(jets)
    origin = np.concatenate(origin)
    n = jet.size
    real = (origin != _FAKE_E) & (origin != _CONVERSION)

    # momentum: a share of the parent's for real electrons, soft for fakes and conversions
    share = rng.beta(2.0, 3.0, n)
    soft = _ELECTRON_PT_MIN + rng.exponential(3.0, n) * (1 + 0.002 * truth.pt[jet])
    pt = np.where(real, np.maximum(share * truth.parent_p[jet], 0.1), soft)
    scale = np.array([_PTREL_SCALE.get(int(o), 0.3) for o in range(6)])[origin]
    ptrel = np.minimum(scale * rng.gamma(2.0, 0.5, n), 0.9 * pt)
    angle = ptrel / pt
    azimuth = rng.uniform(0, 2 * np.pi, n)
    centre = np.where(real[:, None], truth.parent_dir[jet], 0.0)
    deta = centre[:, 0] + angle * np.cos(azimuth)
    dphi = centre[:, 1] + angle * np.sin(azimuth)
    fake_spread = rng.normal(0, 0.15, (n, 2))
    deta = np.where(real, deta, fake_spread[:, 0])
    dphi = np.where(real, dphi, fake_spread[:, 1])
    dr = np.hypot(deta, dphi)
    eta = truth.eta[jet] + deta

    # displacement: from the parent's decay vertex (conversions: material, a few cm out)
    vertex = np.where((origin == _E_FROM_BC)[:, None], truth.cascade_xy[jet], truth.flight_xy[jet])
    x = np.where(real, vertex[:, 0], 0.0)
    y = np.where(real, vertex[:, 1], 0.0)
    conv_r = rng.uniform(30.0, 120.0, n)
    x = np.where(origin == _CONVERSION, conv_r, x)
    d0_true = y * np.cos(dphi) - x * np.sin(dphi)
    d0_true = np.where(origin == _CONVERSION, rng.normal(0.0, 0.8, n), d0_true)
    sigma_d0 = np.hypot(0.012, 0.08 / pt) * rng.lognormal(0.0, 0.15, n)
    d0 = d0_true + sigma_d0 * rng.standard_normal(n)
    sign = np.where(-np.sin(dphi) * d0 >= 0, 1.0, -1.0)

    # identification: real electrons shower in the EM calorimeter and radiate in the TRT
    electron_like = real | (origin == _CONVERSION)
    e_over_p = np.where(electron_like, rng.normal(1.0, 0.12, n), rng.beta(2.0, 3.0, n) * 1.2)
    e_prob_ht = np.where(electron_like, rng.beta(6.0, 2.0, n), rng.beta(1.5, 8.0, n))
    rhad = np.where(electron_like, rng.exponential(0.01, n), rng.exponential(0.12, n))
    # inside a jet everything is non-isolated; heavy-flavour electrons are more so
    isolation = rng.gamma(2.0, 0.3, n) * np.where(real, 1.4, 1.0)

    charge = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    rows = np.zeros(n, dtype=ELECTRON_DTYPE)
    rows["pt"] = pt * 1e3
    rows["ptfrac"] = pt / truth.pt[jet]
    rows["ptrel"] = ptrel * 1e3
    rows["dr"] = dr
    rows["abs_eta"] = np.abs(eta)
    rows["qOverP"] = charge / (pt * np.cosh(eta) * 1e3)
    rows["d0RelativeToBeamspot"] = d0
    rows["d0RelativeToBeamspotSignificance"] = sign * np.abs(d0) / sigma_d0
    rows["ftag_ptVarCone30OverPt"] = isolation
    rows["eProbabilityHT"] = e_prob_ht
    rows["ftag_energyOverP"] = e_over_p
    rows["Rhad"] = rhad
    rows["valid"] = True
    rows["ftagTruthOriginLabel"] = origin
    keep = pt > _ELECTRON_PT_MIN
    jet, pt, rows = jet[keep], pt[keep], rows[keep]
    order = _pt_order(jet, pt)
    return _place(n_jets, jet[order], rows[order], N_ELECTRON_SLOTS, ELECTRON_DTYPE)


# ftagTruthTypeLabel: 0 no truth (fakes), 1 other (pileup), then signed PDG-like codes: 2 pion,
# 3 kaon, 5 electron, 6 muon, the sign being the charge's
_TYPE_CODES = np.array([2, 3, 5, 6])
# per origin (pileup, fake, primary, fromB, fromBC, fromC, fromTau, otherSecondary): the share of
# pions, kaons, electrons, muons; D decays give kaons, semileptonic decays leptons
_TYPE_FRACTIONS = np.array(
    [
        [0.85, 0.12, 0.02, 0.01],
        [0.85, 0.12, 0.02, 0.01],
        [0.85, 0.12, 0.02, 0.01],
        [0.70, 0.18, 0.07, 0.05],
        [0.55, 0.35, 0.06, 0.04],
        [0.55, 0.35, 0.06, 0.04],
        [0.80, 0.05, 0.09, 0.06],
        [0.90, 0.08, 0.02, 0.00],
    ]
)
_B_HADRONS = np.array([511, 521, 531, 5122])
_C_HADRONS = np.array([411, 421, 431, 4122])
_NEUTRINO_LOSS = 0.12  # the jet's energy a semileptonic decay's neutrino takes away


def add_truth_labels(
    rng: np.random.Generator,
    truth: JetTruth,
    jets: np.ndarray,
    tracks: np.ndarray,
    real: np.ndarray,
    electrons: np.ndarray,
) -> None:
    """GN3's extra targets, in place: the truth jet pt (a semileptonic decay's neutrino lowers
    the measured pt, which the jet's electron reveals), the initial hadron's signed PDG ID
    (the b quark's charge; a b -> e decay gives an electron of its sign) and each track's
    particle type (kaons from D decays, leptons from semileptonic ones)."""
    n_jets = truth.pt.size
    lepton = (electrons["valid"] & np.isin(electrons["ftagTruthOriginLabel"], (1, 2, 3))).any(1)
    response = rng.normal(0.97, 0.08, n_jets) - _NEUTRINO_LOSS * lepton
    jets["ptFromTruthDressedWZJet"] = jets["pt_btagJes"] / np.clip(response, 0.5, 1.5)
    # the b (c) quark's sign: a B0bar/B- (b quark) is negative here, as a b -> e- decay
    sign = np.where(rng.random(n_jets) < 0.5, -1, 1)
    e_charge = np.sign(electrons["qOverP"][:, 0])
    from_b = electrons["valid"][:, 0] & (electrons["ftagTruthOriginLabel"][:, 0] == 1)
    sign = np.where(from_b & (e_charge != 0), e_charge.astype(int), sign)
    hadron = np.select(
        [truth.flavour == 0, truth.flavour == 1, truth.flavour == 3],
        [rng.choice(_B_HADRONS, n_jets), rng.choice(_C_HADRONS, n_jets), np.full(n_jets, 15)],
        default=0,
    )
    # a meson with a b quark is a B0bar/B- (negative ID), a baryon with one a Lambda_b (positive)
    baryon = np.isin(hadron, (5122, 4122))
    jets["HadronGhostInitialTruthLabelPdgId"] = np.where(baryon, -sign, sign) * hadron

    origin = truth.track_origin
    cumulative = np.cumsum(_TYPE_FRACTIONS[origin], axis=1)
    kind = (rng.random(origin.size)[:, None] > cumulative).sum(1).clip(max=3)
    code = _TYPE_CODES[kind] * truth.track_charge.astype(np.int64)
    code = np.where(origin == 1, 0, np.where(origin == 0, 1, code))  # fake, pileup
    real["ftagTruthTypeLabel"] = code
    tracks["ftagTruthTypeLabel"][truth.track_jet, truth.track_slot] = code
