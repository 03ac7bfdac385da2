"""The built-in physics-like sample: FTAG-style HDF5 files of b, c, light and tau jets.

The files have the layout of the flavour-tagging preprocessing output (datasets ``jets``,
``tracks``, ``flows`` and ``electrons``, ``norm_dict.yaml``, ``class_dict.yaml``), so everything
that trains on real files can be run and tested on them (flows and electrons:
`salt.data.sample_objects`). The physics is a toy, but the kind of toy a tagger has to work for:

* b-jets carry a secondary (B) and usually a tertiary (B -> D) vertex, c-jets a D vertex, tau jets
  one or three prongs from a short-lived tau; light jets are prompt plus occasional V0s / material
  interactions. Impact parameters follow from the vertex positions and track directions, and are
  then smeared with momentum-dependent resolutions (with non-Gaussian tails).
* every flavour gets pileup tracks (displaced along z) and fake tracks (few hits, poor resolution).
* track multiplicity grows with jet pt; tracks leave no hits on layers inside their production
  radius, so far displaced vertices show up in the hit counts too.

Classes overlap (short flight distances, lost tracks, V0s in light jets, resolution tails), so a
perfect tagger is not possible. Generation is vectorised and block-wise: each block of
``_BLOCK_JETS`` jets draws from its own generator derived from (seed, split, block), so a sample
is reproducible bit for bit and memory stays bounded whatever the number of jets.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from salt.data.sample_objects import (
    ELECTRON_DTYPE,
    ELECTRON_VARIABLES,
    FLOW_DTYPE,
    FLOW_VARIABLES,
    N_ELECTRON_SLOTS,
    N_FLOW_SLOTS,
    JetTruth,
    add_truth_labels,
    make_electrons,
    make_flows,
)
from salt.errors import DISK_FULL, DataError, SampleInterrupted, free_space, os_errno
from salt.signals import Catch
from salt.utils.atomic import temp_name
from salt.utils.h5_output import H5Output

JET_VARIABLES = ["pt_btagJes", "eta_btagJes"]
TRACK_FLOAT_VARIABLES = [
    "d0",
    "z0SinTheta",
    "dphi",
    "deta",
    "qOverP",
    "IP3D_signed_d0_significance",
    "IP3D_signed_z0_significance",
    "phiUncertainty",
    "thetaUncertainty",
    "qOverPUncertainty",
]
TRACK_HIT_VARIABLES = [
    "numberOfPixelHits",
    "numberOfSCTHits",
    "numberOfInnermostPixelLayerHits",
    "numberOfNextToInnermostPixelLayerHits",
    "numberOfInnermostPixelLayerSharedHits",
    "numberOfInnermostPixelLayerSplitHits",
    "numberOfPixelSharedHits",
    "numberOfPixelSplitHits",
    "numberOfSCTSharedHits",
    "numberOfPixelHoles",
    "numberOfSCTHoles",
]
TRACK_VARIABLES = TRACK_FLOAT_VARIABLES + TRACK_HIT_VARIABLES
FLAVOUR_NAMES = ["bjets", "cjets", "ujets", "taujets"]
ORIGIN_NAMES = [
    "pileup",
    "fake",
    "primary",
    "fromB",
    "fromBC",
    "fromC",
    "fromTau",
    "otherSecondary",
]
N_TRACK_SLOTS = 40

JET_DTYPE = np.dtype(
    [
        ("pt_btagJes", np.float32),
        ("eta_btagJes", np.float32),
        ("HadronConeExclTruthLabelID", np.int32),
        ("flavour_label", np.int32),
        ("n_tracks", np.int32),
        # GN3's extra targets, from the objects' stream (salt.data.sample_objects)
        ("ptFromTruthDressedWZJet", np.float32),
        ("HadronGhostInitialTruthLabelPdgId", np.int32),
    ]
)
TRACK_DTYPE = np.dtype(
    [(name, np.float32) for name in TRACK_FLOAT_VARIABLES]
    + [(name, np.uint8) for name in TRACK_HIT_VARIABLES]
    + [("valid", np.bool_), ("ftagTruthOriginLabel", np.int8), ("ftagTruthVertexIndex", np.int8)]
    + [("ftagTruthTypeLabel", np.int8)]  # from the objects' stream (salt.data.sample_objects)
)

SPLITS = ("train", "val", "test")
# Part of the sample's definition: changing the block size changes the generated jets.
_BLOCK_JETS = 20_000
_JET_CHUNK = 1_000
_TRACK_CHUNK_JETS = 100

# Origin codes, index into ORIGIN_NAMES.
_PILEUP, _FAKE, _PRIMARY, _FROM_B, _FROM_BC, _FROM_C, _FROM_TAU, _OTHER_SECONDARY = range(8)
_N_ORIGINS = len(ORIGIN_NAMES)
_B, _C, _LIGHT, _TAU = range(4)

# --- jets (energies in GeV, lengths in mm inside this module; pt is stored in MeV) ---
_FLAVOUR_FRACTIONS = np.array([0.30, 0.25, 0.35, 0.10])
_HADRON_LABELS = np.array([5, 4, 0, 15], dtype=np.int32)
_PT_MIN, _PT_MAX, _PT_INDEX = 20.0, 800.0, 2.0  # truncated power law dN/dpt ~ pt^-(index+1)
_ETA_MAX = 2.5

# --- track multiplicity: Poisson means ---
_PRIMARY_MEAN = np.array([5.5, 6.0, 7.0, 1.5])  # per flavour, at the lowest pt
_PRIMARY_PT_SLOPE = 0.6  # mean grows as 1 + slope * log(pt / pt_min)
_FROM_B_MEAN, _FROM_BC_MEAN, _FROM_C_MEAN = 2.2, 1.8, 1.8
_TAU_THREE_PRONG, _TAU_PRONG_EFFICIENCY = 0.23, 0.92
_PILEUP_MEAN, _FAKE_MEAN, _V0_MEAN = 0.8, 0.25, 0.12

# --- momenta: jet pt shared among its tracks with gamma-distributed weights ---
_CHARGED_FRACTION = 0.6
# Per origin (ORIGIN_NAMES order): heavy-flavour and tau decay products are harder than prompt
# fragmentation tracks. Pileup and fakes get their own soft spectrum instead.
_MOMENTUM_SHAPE = np.array([1.0, 1.0, 0.8, 2.0, 1.5, 2.0, 3.0, 0.7])
_TRACK_PT_MIN = 0.5  # the usual track selection cut
_PILEUP_PT_SCALE, _FAKE_PT_SCALE = 1.0, 2.0

# --- decays: mass (GeV), c*tau (mm), momentum share of the decaying particle ---
_PARENT_MASS = np.array([5.28, 1.87, 1.0, 1.777])  # B, D, (unused for light), tau
_PARENT_CTAU = np.array([0.455, 0.20, 0.0, 0.087])
_PARENT_SHARE = np.array([0.75, 0.60, 0.0, 0.75])
_D_MASS, _D_CTAU, _D_SHARE = 1.87, 0.20, 0.60  # the D from a B decay
_V0_MEAN_FLIGHT = 20.0
_MAX_FLIGHT = 110.0  # keep production vertices inside the last pixel layer
# Per origin: typical momentum (GeV) of a decay product transverse to its parent, which sets
# the opening angle (and so, with the flight distance, the impact parameter).
_DECAY_PT = np.array([0.0, 0.0, 0.0, 0.8, 0.5, 0.5, 0.6, 0.15])
_CONE = 0.6  # track-jet association reach in deta and dphi

# --- detector: pixel layer radii (mm), resolutions ---
_IBL_R, _BLAYER_R, _L1_R = 33.0, 50.5, 88.5
_LAYER_EFFICIENCY = 0.97
_PILEUP_Z0_SIGMA, _FAKE_D0_SIGMA, _FAKE_Z0_SIGMA = 1.5, 0.5, 1.0
_TAIL_FRACTION, _TAIL_SCALE = 0.08, 3.0


def _block_rng(seed: int, split: int, block: int, stream: int = 0) -> np.random.Generator:
    """Independent PCG64 stream for one block of one split (stream 0: jets and tracks, 1: the
    other objects, so these came without changing the jets and tracks)."""
    key = [seed, split, block] if stream == 0 else [seed, split, block, stream]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def _segment_rank(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """Position of each element within its run, for ``keys`` sorted ascending in [0, n_keys)."""
    counts = np.bincount(keys, minlength=n_keys)
    starts = np.cumsum(counts) - counts
    return np.arange(keys.size) - starts[keys]


def _soft_cone(x: np.ndarray) -> np.ndarray:
    """Squash angles smoothly into (-_CONE, _CONE): no pile-up of tracks at a hard edge."""
    return _CONE * np.tanh(x / _CONE)


def _generate(
    rng: np.random.Generator, n_jets: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, JetTruth]:
    """Generate ``n_jets`` jets: (jets, padded tracks, real tracks only in jet order, the truth
    the other objects are made from)."""
    # ---- jets ----
    flavour = np.searchsorted(np.cumsum(_FLAVOUR_FRACTIONS)[:-1], rng.random(n_jets), "right")
    span = 1.0 - (_PT_MAX / _PT_MIN) ** -_PT_INDEX
    pt = _PT_MIN * (1.0 - rng.random(n_jets) * span) ** (-1.0 / _PT_INDEX)
    eta = rng.uniform(-_ETA_MAX, _ETA_MAX, n_jets)
    log_pt = np.log(pt / _PT_MIN)
    is_b, is_c, is_tau = flavour == _B, flavour == _C, flavour == _TAU

    # ---- how many tracks of each origin ----
    counts = np.zeros((n_jets, _N_ORIGINS), dtype=np.int64)
    counts[:, _PRIMARY] = rng.poisson(_PRIMARY_MEAN[flavour] * (1 + _PRIMARY_PT_SLOPE * log_pt))
    counts[:, _PILEUP] = rng.poisson(_PILEUP_MEAN, n_jets)
    counts[:, _FAKE] = rng.poisson(_FAKE_MEAN * (1 + 0.3 * log_pt))
    counts[:, _FROM_B] = np.where(is_b, rng.poisson(_FROM_B_MEAN, n_jets), 0)
    counts[:, _FROM_BC] = np.where(is_b, rng.poisson(_FROM_BC_MEAN, n_jets), 0)
    counts[:, _FROM_C] = np.where(is_c, rng.poisson(_FROM_C_MEAN, n_jets), 0)
    prongs = np.where(rng.random(n_jets) < _TAU_THREE_PRONG, 3, 1)
    counts[:, _FROM_TAU] = np.where(is_tau, rng.binomial(prongs, _TAU_PRONG_EFFICIENCY), 0)
    n_v0 = rng.poisson(_V0_MEAN * (1 + 0.5 * log_pt))
    counts[:, _OTHER_SECONDARY] = 2 * n_v0  # two daughters each
    # Every jet keeps at least one track (as after the usual preprocessing selection), so that
    # attention over a jet's tracks is never empty.
    counts[:, _PRIMARY] += counts.sum(axis=1) == 0

    # One entry per track, grouped by (jet, origin).
    group = np.repeat(np.arange(n_jets * _N_ORIGINS), counts.ravel())
    jet, origin = group // _N_ORIGINS, group % _N_ORIGINS
    v0 = (np.cumsum(n_v0) - n_v0)[jet] + _segment_rank(group, n_jets * _N_ORIGINS) // 2

    # Random order within each jet, so the position of a track says nothing; then keep at most
    # N_TRACK_SLOTS per jet (a random subset when there are more).
    order = np.argsort(jet + rng.random(jet.size), kind="stable")
    jet, origin, v0 = jet[order], origin[order], v0[order]
    slot = _segment_rank(jet, n_jets)
    keep = slot < N_TRACK_SLOTS
    jet, origin, v0, slot = jet[keep], origin[keep], v0[keep], slot[keep]
    n_trk = jet.size
    in_jet = (origin != _PILEUP) & (origin != _FAKE)
    fake = origin == _FAKE

    # ---- track momenta ----
    weight = rng.gamma(_MOMENTUM_SHAPE[origin])
    weight_sum = np.bincount(jet, weights=np.where(in_jet, weight, 0.0), minlength=n_jets)
    trk_pt = _CHARGED_FRACTION * pt[jet] * weight / np.maximum(weight_sum[jet], 1e-12)
    soft = _TRACK_PT_MIN + rng.exponential(np.where(fake, _FAKE_PT_SCALE, _PILEUP_PT_SCALE))
    trk_pt = np.maximum(np.where(in_jet, trk_pt, soft), _TRACK_PT_MIN)

    # ---- decay vertices: positions (x along the jet in the transverse plane) and directions ----
    p_parent = _PARENT_SHARE[flavour] * pt * np.clip(rng.normal(1.0, 0.15, n_jets), 0.4, 1.3)
    flight = rng.exponential(1.0, n_jets) * p_parent / _PARENT_MASS[flavour] * _PARENT_CTAU[flavour]
    flight = np.minimum(flight, _MAX_FLIGHT)
    axis_spread = 0.005 + 1.0 / pt  # parent direction vs jet axis
    deta_a = rng.normal(0.0, axis_spread)
    dphi_a = rng.normal(0.0, axis_spread)
    xa, ya = flight * np.cos(dphi_a), flight * np.sin(dphi_a)
    za = flight * np.sinh(eta + deta_a)

    # Tertiary vertex of b-jets: the D from the B decay flies on from the B vertex.
    p_d = _D_SHARE * p_parent * np.clip(rng.normal(1.0, 0.25, n_jets), 0.3, 1.6)
    d_spread = np.minimum(1.0 / np.maximum(p_d, 1e-3), 0.3)
    deta_d = deta_a + rng.normal(0.0, 1.0, n_jets) * d_spread
    dphi_d = dphi_a + rng.normal(0.0, 1.0, n_jets) * d_spread
    flight_d = rng.exponential(1.0, n_jets) * p_d / _D_MASS * _D_CTAU
    xd = xa + flight_d * np.cos(dphi_d)
    yd = ya + flight_d * np.sin(dphi_d)
    zd = za + flight_d * np.sinh(eta + deta_d)
    rd = np.hypot(xd, yd)
    shrink = np.minimum(1.0, _MAX_FLIGHT / np.maximum(rd, 1e-12))
    xd, yd, zd = xd * shrink, yd * shrink, zd * shrink

    # V0s and material interactions, one vertex per pair of tracks.
    n_v0_total = int(n_v0.sum())
    flight_v = np.minimum(rng.exponential(_V0_MEAN_FLIGHT, n_v0_total), _MAX_FLIGHT)
    deta_v = rng.normal(0.0, 0.15, n_v0_total)
    dphi_v = rng.normal(0.0, 0.15, n_v0_total)
    v0_jet = np.repeat(np.arange(n_jets), n_v0)
    xv, yv = flight_v * np.cos(dphi_v), flight_v * np.sin(dphi_v)
    zv = flight_v * np.sinh(eta[v0_jet] + deta_v)

    # Per track: production point and the direction its angular spread is centred on.
    x, y, z = np.zeros(n_trk), np.zeros(n_trk), np.zeros(n_trk)
    deta_c, dphi_c = np.zeros(n_trk), np.zeros(n_trk)
    from_a = (origin == _FROM_B) | (origin == _FROM_C) | (origin == _FROM_TAU)
    for mask, idx, px, py, pz, ce, cp in (
        (from_a, jet, xa, ya, za, deta_a, dphi_a),
        (origin == _FROM_BC, jet, xd, yd, zd, deta_d, dphi_d),
        (origin == _OTHER_SECONDARY, v0, xv, yv, zv, deta_v, dphi_v),
    ):
        i = idx[mask]
        x[mask], y[mask], z[mask] = px[i], py[i], pz[i]
        deta_c[mask], dphi_c[mask] = ce[i], cp[i]

    spread = np.where(
        in_jet & (origin != _PRIMARY),
        np.clip(_DECAY_PT[origin] / trk_pt, 0.003, 0.35),
        np.where(in_jet, 0.03 + 0.12 / np.sqrt(trk_pt), 0.2),
    )
    deta = _soft_cone(deta_c + spread * rng.standard_normal(n_trk))
    dphi = _soft_cone(dphi_c + spread * rng.standard_normal(n_trk))
    trk_eta = eta[jet] + deta
    cosh_eta = np.cosh(trk_eta)
    sin_theta = 1.0 / cosh_eta

    # ---- true impact parameters (jet along phi = 0, so d0 is rotation invariant) ----
    d0_true = y * np.cos(dphi) - x * np.sin(dphi)
    path = x * np.cos(dphi) + y * np.sin(dphi)  # transverse path back to the closest approach
    z0st_true = (z - path * np.sinh(trk_eta)) * sin_theta
    pileup = origin == _PILEUP
    z0st_true = np.where(pileup, rng.normal(0.0, _PILEUP_Z0_SIGMA, n_trk), z0st_true)
    d0_true = np.where(fake, rng.normal(0.0, _FAKE_D0_SIGMA, n_trk), d0_true)
    z0st_true = np.where(fake, rng.normal(0.0, _FAKE_Z0_SIGMA, n_trk), z0st_true)

    # ---- hits: no hit on a layer inside the production radius ----
    radius = np.hypot(x, y)
    eff = np.where(fake, 0.55, _LAYER_EFFICIENCY)
    ibl = (radius < _IBL_R) & (rng.random(n_trk) < eff)
    blayer = (radius < _BLAYER_R) & (rng.random(n_trk) < eff)
    layer1 = (radius < _L1_R) & (rng.random(n_trk) < eff)
    layer2 = rng.random(n_trk) < eff
    overlap = ~fake & (rng.random(n_trk) < 0.1)  # module overlaps give an extra hit
    pixel = np.sum([ibl, blayer, layer1, layer2, overlap], axis=0, dtype=np.int64)
    sct = np.where(fake, 4 + rng.binomial(5, 0.5, n_trk), 7 + rng.binomial(3, 0.45, n_trk))
    # Shared/split clusters: rare, more in dense (high-pt) cores and for fakes.
    p_shared = np.where(fake, 0.15, 0.01 + 0.04 * np.minimum(pt[jet] / 400.0, 1.0))
    ibl_shared = ibl & (rng.random(n_trk) < p_shared)
    ibl_split = ibl & (rng.random(n_trk) < 0.8 * p_shared)
    pixel_shared = ibl_shared + rng.binomial(pixel - ibl, 0.5 * p_shared)
    pixel_split = ibl_split + rng.binomial(pixel - ibl, 0.4 * p_shared)
    sct_shared = rng.binomial(sct, np.where(fake, 0.05, 0.005))
    pixel_holes = rng.random(n_trk) < np.where(fake, 0.15, 0.02)
    sct_holes = rng.random(n_trk) < np.where(fake, 0.25, 0.04)

    # ---- resolutions and measured values ----
    quality = rng.lognormal(0.0, 0.12, n_trk) * np.where(fake, rng.uniform(1.5, 4.0, n_trk), 1.0)
    quality *= np.where(ibl, 1.0, np.where(blayer, 1.6, 2.5))  # lever arm lost with inner hits
    pt_term = 1.0 / (trk_pt * np.sqrt(sin_theta))
    sigma_d0 = np.hypot(0.010, 0.075 * pt_term) * quality
    sigma_z0 = np.hypot(0.030, 0.090 * pt_term) * quality
    tails = np.where(rng.random(n_trk) < _TAIL_FRACTION, _TAIL_SCALE, 1.0)
    d0 = d0_true + sigma_d0 * tails * rng.standard_normal(n_trk)
    tails = np.where(rng.random(n_trk) < _TAIL_FRACTION, _TAIL_SCALE, 1.0)
    z0st = z0st_true + sigma_z0 * tails * rng.standard_normal(n_trk)
    # Lifetime signs: positive when the track crosses the jet axis downstream of the vertex.
    d0_sig = np.where(-np.sin(dphi) * d0 >= 0, 1.0, -1.0) * np.abs(d0) / sigma_d0
    z0_sig = np.where(-deta * z0st >= 0, 1.0, -1.0) * np.abs(z0st) / sigma_z0

    p = trk_pt * cosh_eta
    charge = np.where(rng.random(n_trk) < 0.5, -1.0, 1.0)
    sigma_qop = np.hypot(4e-4, 0.012 / p) * quality  # 1/GeV
    qop = charge / p + sigma_qop * rng.standard_normal(n_trk)
    sigma_phi = np.hypot(8e-5, 1.8e-3 / trk_pt) * quality
    sigma_theta = np.hypot(3e-5, 0.9e-3 / p) * quality

    # ---- truth vertex index: compact per jet, shared by tracks of one vertex ----
    raw_vertex = np.select(
        [origin == _PRIMARY, origin == _FROM_BC, from_a, origin == _OTHER_SECONDARY],
        [np.zeros_like(v0), np.full_like(v0, 2), np.ones_like(v0), 3 + v0],
        default=-1,
    )
    has_vertex = raw_vertex >= 0
    # v0 is a block-global index, so (jet, raw_vertex) stays unique as one int64 key.
    key = jet[has_vertex] * (n_v0_total + 4) + raw_vertex[has_vertex]
    unique_keys, inverse = np.unique(key, return_inverse=True)
    vertex_rank = _segment_rank(unique_keys // (n_v0_total + 4), n_jets)
    vertex_index = np.full(n_trk, -1, dtype=np.int64)
    vertex_index[has_vertex] = vertex_rank[inverse]

    # ---- assemble the structured arrays ----
    n_tracks = np.bincount(jet, minlength=n_jets)
    jets = np.zeros(n_jets, dtype=JET_DTYPE)
    jets["pt_btagJes"] = pt * 1e3
    jets["eta_btagJes"] = eta
    jets["HadronConeExclTruthLabelID"] = _HADRON_LABELS[flavour]
    jets["flavour_label"] = flavour
    jets["n_tracks"] = n_tracks

    real = np.zeros(n_trk, dtype=TRACK_DTYPE)
    real["d0"] = d0
    real["z0SinTheta"] = z0st
    real["dphi"] = dphi
    real["deta"] = deta
    real["qOverP"] = qop * 1e-3  # stored per MeV, like the pt
    real["IP3D_signed_d0_significance"] = d0_sig
    real["IP3D_signed_z0_significance"] = z0_sig
    real["phiUncertainty"] = sigma_phi
    real["thetaUncertainty"] = sigma_theta
    real["qOverPUncertainty"] = sigma_qop * 1e-3
    real["numberOfPixelHits"] = pixel
    real["numberOfSCTHits"] = sct
    real["numberOfInnermostPixelLayerHits"] = ibl
    real["numberOfNextToInnermostPixelLayerHits"] = blayer
    real["numberOfInnermostPixelLayerSharedHits"] = ibl_shared
    real["numberOfInnermostPixelLayerSplitHits"] = ibl_split
    real["numberOfPixelSharedHits"] = pixel_shared
    real["numberOfPixelSplitHits"] = pixel_split
    real["numberOfSCTSharedHits"] = sct_shared
    real["numberOfPixelHoles"] = pixel_holes
    real["numberOfSCTHoles"] = sct_holes
    real["valid"] = True
    real["ftagTruthOriginLabel"] = origin
    real["ftagTruthVertexIndex"] = vertex_index

    # Padding: zeros, labels -1; real tracks go to the first slots of their jet.
    tracks = np.zeros((n_jets, N_TRACK_SLOTS), dtype=TRACK_DTYPE)
    tracks["ftagTruthOriginLabel"] = -1
    tracks["ftagTruthVertexIndex"] = -1
    tracks["ftagTruthTypeLabel"] = -1
    # Copy whole records as raw bytes: numpy's structured fancy assignment is several times slower.
    record_bytes = (-1, TRACK_DTYPE.itemsize)
    slots = tracks.reshape(-1).view(np.uint8).reshape(record_bytes)
    slots[jet * N_TRACK_SLOTS + slot] = real.view(np.uint8).reshape(record_bytes)
    light = flavour == _LIGHT
    truth = JetTruth(
        flavour=flavour,
        pt=pt,
        eta=eta,
        parent_p=np.where(light, 0.0, p_parent),
        flight_xy=np.stack([np.where(light, 0.0, xa), np.where(light, 0.0, ya)], axis=1),
        cascade_xy=np.stack([xd, yd], axis=1),
        parent_dir=np.stack([np.where(light, 0.0, deta_a), np.where(light, 0.0, dphi_a)], 1),
        track_jet=jet,
        track_slot=slot,
        track_origin=origin,
        track_charge=charge,
        track_pt=trk_pt,
        track_deta=deta,
        track_dphi=dphi,
    )
    return jets, tracks, real, truth


class _RunningMoments:
    """Streaming mean and (population) std per variable, merged block by block in float64."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.count = 0
        self.mean = np.zeros(len(self.names))
        self.m2 = np.zeros(len(self.names))

    def block_moments(self, rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """(count, mean, sum of squared deviations) of one block of structured rows."""
        if rows.shape[0] == 0:
            return 0, np.zeros(len(self.names)), np.zeros(len(self.names))
        block = np.stack([rows[name].astype(np.float64) for name in self.names])
        mean = block.mean(axis=1)
        return rows.shape[0], mean, ((block - mean[:, None]) ** 2).sum(axis=1)

    def merge(self, moments: tuple[int, np.ndarray, np.ndarray]) -> None:
        """Add a block's moments (Chan et al.: stable where sums of squares would cancel)."""
        n, mean, m2 = moments
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total

    def result(self) -> dict[str, dict[str, float]]:
        """{variable: {mean, std}}; a constant (or absent) variable gets std 1, not 0."""
        std = np.sqrt(self.m2 / max(self.count, 1))
        return {
            name: {"mean": float(mean), "std": float(s) if s > 0 else 1.0}
            for name, mean, s in zip(self.names, self.mean, std, strict=True)
        }


def _balanced_weights(counts: np.ndarray) -> list[float]:
    """n_total / (n_classes * n_c); an empty class gets the largest weight of the others."""
    counts = counts.astype(np.float64)
    present = counts > 0
    if not present.any():
        return [1.0] * counts.size
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (counts.size * counts[present])
    weights[~present] = weights[present].max()
    return [float(w) for w in weights]


@dataclass
class _SplitSummary:
    """What norm_dict and class_dict need from a split: input moments and class counts."""

    jets: _RunningMoments = field(default_factory=lambda: _RunningMoments(JET_VARIABLES))
    tracks: _RunningMoments = field(default_factory=lambda: _RunningMoments(TRACK_VARIABLES))
    flows: _RunningMoments = field(default_factory=lambda: _RunningMoments(FLOW_VARIABLES))
    electrons: _RunningMoments = field(default_factory=lambda: _RunningMoments(ELECTRON_VARIABLES))
    flavours: np.ndarray = field(default_factory=lambda: np.zeros(len(FLAVOUR_NAMES), np.int64))
    origins: np.ndarray = field(default_factory=lambda: np.zeros(_N_ORIGINS, np.int64))


# SIGINT and SIGTERM while the command line runs (Ctrl-C, Slurm's cancel). They are only
# recorded: a KeyboardInterrupt thrown into the middle of the thread pool or an HDF5 call can
# hang the exit; the writer checks between blocks instead (one block takes well under a second).
_SIGNALS = Catch(("SIGINT", "SIGTERM"))


def _stop_if_signalled() -> None:
    if _SIGNALS.first is not None:
        raise SampleInterrupted(_SIGNALS.first)


def _write_split(path: Path, n_jets: int, seed: int, split: int) -> _SplitSummary:
    """Write one split to ``path`` block by block; return its summary (real tracks only)."""
    summary = _SplitSummary()

    def make_block(block: int) -> dict[str, Any]:
        start = block * _BLOCK_JETS
        jets, tracks, real, truth = _generate(
            _block_rng(seed, split, block), min(_BLOCK_JETS, n_jets - start)
        )
        objects = _block_rng(seed, split, block, stream=1)
        flows, electrons = make_flows(objects, truth), make_electrons(objects, truth)
        add_truth_labels(objects, truth, jets, tracks, real, electrons)
        return {
            "jets": jets,
            "tracks": tracks,
            "flows": flows,
            "electrons": electrons,
            "moments": {
                "jets": summary.jets.block_moments(jets),
                "tracks": summary.tracks.block_moments(real),
                "flows": summary.flows.block_moments(flows[flows["valid"]]),
                "electrons": summary.electrons.block_moments(electrons[electrons["valid"]]),
            },
            "origins": np.bincount(real["ftagTruthOriginLabel"], minlength=_N_ORIGINS),
        }

    # H5Output: a full disk is an OSError here, not a half-closed HDF5 file (and a crash at exit)
    with H5Output(path) as out:
        f = out.file
        f.attrs["generator"] = "salt.data.sample"
        f.attrs["seed"] = seed
        f.attrs["split"] = SPLITS[split]
        common = {"compression": "lzf", "track_times": False}
        jets_ds = f.create_dataset(
            "jets", shape=(n_jets,), dtype=JET_DTYPE, chunks=(min(_JET_CHUNK, n_jets),), **common
        )
        jets_ds.attrs["flavour_label"] = FLAVOUR_NAMES
        objects = {
            name: f.create_dataset(
                name,
                shape=(n_jets, slots),
                dtype=dtype,
                chunks=(min(_TRACK_CHUNK_JETS, n_jets), slots),
                **common,
            )
            for name, slots, dtype in (
                ("tracks", N_TRACK_SLOTS, TRACK_DTYPE),
                ("flows", N_FLOW_SLOTS, FLOW_DTYPE),
                ("electrons", N_ELECTRON_SLOTS, ELECTRON_DTYPE),
            )
        }
        # Generate the next block on a second thread while this one is compressed and written
        # (numpy releases the GIL in its loops); write and merge in block order, so the result
        # does not depend on timing. More generator threads did not help: the rest is GIL-bound.
        n_blocks = -(-n_jets // _BLOCK_JETS)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(make_block, 0)
            for block in range(n_blocks):
                made = pending.result()
                _stop_if_signalled()
                if block + 1 < n_blocks:
                    pending = pool.submit(make_block, block + 1)
                out.check()  # stop at the first failed write, not after the whole split
                jets = made["jets"]
                rows = slice(block * _BLOCK_JETS, block * _BLOCK_JETS + len(jets))
                jets_ds[rows] = jets
                for name, ds in objects.items():
                    ds[rows] = made[name]
                for name, moments in made["moments"].items():
                    getattr(summary, name).merge(moments)
                summary.flavours += np.bincount(jets["flavour_label"], minlength=len(FLAVOUR_NAMES))
                summary.origins += made["origins"]
    return summary


def _temp_path(out_dir: Path, name: str) -> Path:
    """A unique hidden name next to the final one (same filesystem, so the rename is atomic).

    Not created here: files are created by their writer with the usual umask permissions.
    """
    return out_dir / temp_name(name)


def _write_yaml(path: Path, comment: str, data: dict) -> None:
    """Write ``data`` as YAML after a comment header; fails if ``path`` exists."""
    with path.open("x") as f:
        f.write(comment + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


def write_sample(out_dir: str | Path, num_jets: int, seed: int = 42) -> dict[str, Path]:
    """Write train/val/test HDF5 files, norm_dict.yaml and class_dict.yaml into ``out_dir``.

    ``train.h5`` holds ``num_jets`` jets, ``val.h5`` and ``test.h5`` ``max(num_jets // 4, 1)``
    each, from independent random streams. Normalisation and class weights come from the
    training file only. Files appear under their final names only once all are complete.
    """
    if isinstance(num_jets, bool) or not isinstance(num_jets, int | np.integer) or num_jets < 1:
        raise ValueError(f"write_sample: num_jets must be an integer >= 1, got {num_jets!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"write_sample: seed must be an integer >= 0, got {seed!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"write_sample: output path {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    num_jets, seed = int(num_jets), int(seed)

    final = {
        "train": out_dir / "train.h5",
        "val": out_dir / "val.h5",
        "test": out_dir / "test.h5",
        "norm_dict": out_dir / "norm_dict.yaml",
        "class_dict": out_dir / "class_dict.yaml",
    }
    temps = {key: _temp_path(out_dir, path.name) for key, path in final.items()}
    try:
        n_eval = max(num_jets // 4, 1)
        train = _write_split(temps["train"], num_jets, seed, SPLITS.index("train"))
        _write_split(temps["val"], n_eval, seed, SPLITS.index("val"))
        _write_split(temps["test"], n_eval, seed, SPLITS.index("test"))

        header = (
            f"# salt.data.sample (seed {seed}): from {final['train'].name}, real tracks only.\n"
        )
        norm_dict = {
            name: getattr(train, name).result() for name in ("jets", "tracks", "flows", "electrons")
        }
        _write_yaml(
            temps["norm_dict"],
            header + "# Population mean and std; a constant variable gets std 1.\n",
            norm_dict,
        )
        class_dict = {
            "jets": {"flavour_label": _balanced_weights(train.flavours)},
            "tracks": {"ftagTruthOriginLabel": _balanced_weights(train.origins)},
        }
        _write_yaml(
            temps["class_dict"],
            header + "# Balanced weights n_total / (n_classes * n_class); a class absent from the"
            " training file gets the largest weight of the others.\n",
            class_dict,
        )
        for key, path in final.items():
            os.replace(temps.pop(key), path)
    except OSError as err:
        if os_errno(err) not in DISK_FULL:
            raise
        raise DataError(
            f"{out_dir}: could not write the built-in sample ({num_jets} training jets): "
            f"{os.strerror(os_errno(err) or 0)}; {free_space(out_dir)} there; nothing was kept. "
            "Free space, or set data.sample.dir to a directory with room (or fewer "
            "data.sample.num_jets), and run again."
        ) from err
    finally:
        for tmp in temps.values():  # only left on failure or interruption
            tmp.unlink(missing_ok=True)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m salt.data.sample OUT_DIR --jets N --seed S``."""
    parser = argparse.ArgumentParser(
        prog="python -m salt.data.sample",
        description="Write the built-in physics-like FTAG sample (train/val/test, norm and "
        "class dicts).",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write into (created if missing)")
    parser.add_argument("--jets", type=int, default=100_000, help="training jets (default 100000)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with _SIGNALS:
        try:
            paths = write_sample(args.out_dir, args.jets, args.seed)
        except ValueError as err:
            parser.error(str(err))
        except SampleInterrupted as err:
            print(f"salt.data.sample: {err}; no file was left behind", file=sys.stderr)
            return 128 + err.signum
        elapsed = time.perf_counter() - start
        print(f"wrote the sample (seed {args.seed}) in {elapsed:.1f} s:")
        for key, path in paths.items():
            print(f"  {key:<10} {path}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
