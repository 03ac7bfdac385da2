"""Vertices from the vertexing task: tracks grouped by their same-vertex pair probabilities.

One definition for the predictions file (`salt.evaluation.predictions`) and the ONNX model
(`salt.onnx.model`), so both give every track the same group.
"""

from __future__ import annotations

import torch
from torch import Tensor

VERTEX_THRESHOLD = 0.5
# The ONNX graph closes the track graph in a fixed number of squarings: 10 joins paths of up
# to 2**10 tracks, far above any track selection's count (40 for GN2).
ONNX_ROUNDS = 10


def closure_rounds(slots: int) -> int:
    """Squarings of the adjacency that join every path among ``slots`` tracks: paths have
    at most ``slots - 1`` steps, ``r`` squarings join ``2**r``."""
    return max(slots - 2, 0).bit_length()


def vertex_groups(
    pair_probs: Tensor,
    pad_mask: Tensor,
    threshold: float = VERTEX_THRESHOLD,
    rounds: int | None = None,
) -> Tensor:
    """Vertex index per track from same-vertex pair probabilities ``[B, T, T]``.

    Connected components of the real tracks, joined where ``(p_ij + p_ji) / 2 > threshold``;
    numbered 0, 1, ... per jet in the order of their first track; padded slots get -1.
    ``rounds``: squarings of the adjacency (default: enough for ``T`` tracks); a traced graph
    passes a constant, as its track count is not known when it is recorded.
    """
    slots = pad_mask.shape[1]
    real = ~pad_mask
    sym = 0.5 * (pair_probs + pair_probs.transpose(1, 2))
    index = torch.arange(slots, device=pad_mask.device)
    eye = index[:, None] == index[None, :]  # not torch.eye: onnxruntime has no boolean EyeLike
    reach = ((sym > threshold) | eye) & real[:, :, None] & real[:, None, :]
    # Each squaring doubles the path length reach covers: no data-dependent loop, so the same
    # code traces into ONNX. Counts stay below T, exact in float32.
    for _ in range(closure_rounds(slots) if rounds is None else rounds):
        r = reach.float()
        reach = torch.bmm(r, r) > 0
    # the lowest slot a track reaches names its component (its own slot at most)
    label = torch.where(reach, index, slots).amin(dim=2)
    roots = real & (label == index)
    number = roots.long().cumsum(dim=1) - 1  # component number of each root
    groups = number.gather(1, label.clamp(max=slots - 1))
    return torch.where(real, groups, torch.full_like(groups, -1))
