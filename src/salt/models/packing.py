"""Packed track layout: the real tracks of a batch as the rows of one matrix.

A padded batch holds `B x T` track slots of which (in real data) only about a third are
real. Everything computed per track (dense nets, projections, norms, track task heads) is
the same function on the packed rows `[N, ...]` at a fraction of the cost.

Rows are grouped by jet multiplicity: the jets with `n` real tracks form one contiguous
block of rows, a `[jets, n, ...]` view without padding. Attention runs block by block on
these views (no mask, no padded keys), and track pairs (vertexing) are built block by block
as `[jets, n, n, ...]`: all ordered pairs of real tracks of the same jet, `i == j` included.
Track outputs are returned in the padded layout, zero in padded slots (`unpack`).

A `Packing` is built once per forward from the pad mask and reused by every layer and task.
It needs the multiplicity counts on the host: counted from the batch's CPU mask before the
batch goes to the GPU (`jets_per_multiplicity`), it needs no host sync (`append_tokens` adds
none); from a GPU mask alone, one sync.
`append_tokens` gives the packing of the same jets with learned tokens (the encoder's
registers) appended to each; its `tracks()` selects the track rows again, in the order of
the original packing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Block:
    """The jets with `size` real tracks: `num_jets` of them, `size * num_jets` packed rows."""

    size: int
    num_jets: int


@dataclass(frozen=True, eq=False)
class Packing:
    """Where the real tracks of a padded batch are, to pack and unpack per-track tensors.

    `pad_mask[B, T]`: True for padded slots. `jet_order[B]`: the jets by multiplicity
    (stable), those without tracks first (`num_empty`), then one `Block` per multiplicity
    present; `slot[N]`: the flat slot index `b * T + t` of each packed row.

    Blocks are cut with `torch.split` (one view each, gradients joined by one `cat`), not
    by slicing: the gradient of every slice would be a full-size tensor. A batch without
    any real track has no blocks: the block methods need at least one.

    `track_rows[N_tracks]` (only in a packing made by `append_tokens`): the rows that hold the
    tracks, in the order of the packing it was made from.
    """

    pad_mask: Tensor
    jet_order: Tensor
    slot: Tensor
    num_empty: int
    blocks: tuple[Block, ...]
    track_rows: Tensor | None = None

    @classmethod
    def from_mask(cls, pad_mask: Tensor, jets_per_size: Sequence[int] | None = None) -> Packing:
        """The packing of `pad_mask[B, T]` (True = padded).

        `jets_per_size` (`jets_per_multiplicity` of the same mask, counted on the host before
        the batch went to the device) spares the one device-to-host copy the packing needs.
        """
        num_slots = pad_mask.shape[1]
        real = ~pad_mask
        per_jet = real.sum(dim=1)
        jet_order = torch.argsort(per_jet, stable=True)
        if jets_per_size is None:
            jets_per_size = jets_per_multiplicity(pad_mask)  # a host sync on a GPU
        elif len(jets_per_size) != num_slots + 1:
            raise ValueError(
                f"jets_per_size has {len(jets_per_size)} entries for a mask of "
                f"{num_slots} track slots (expected {num_slots + 1})"
            )
        blocks = tuple(Block(n, count) for n, count in enumerate(jets_per_size) if n and count)
        num_tracks = sum(b.size * b.num_jets for b in blocks)
        slot = _real_slots(real, jet_order, num_tracks)
        return cls(pad_mask, jet_order, slot, jets_per_size[0], blocks)

    def append_tokens(self, num: int) -> tuple[Packing, Tensor]:
        """The packing of these jets with `num` always-real tokens after their tracks, and
        `order`: for each of its rows, the row of `cat([packed tracks, tokens])` it takes,
        where token `k` of jet `b` is row `N + b * num + k`."""
        batch_size, num_slots = self.pad_mask.shape
        width = num_slots + num
        mask = torch.cat([self.pad_mask, self.pad_mask.new_zeros(batch_size, num)], dim=1)
        # derived from this packing (no second sort, no host sync): every jet gains `num`
        # rows, so the jet order is unchanged and jets without tracks form the first block
        empty = (Block(num, self.num_empty),) if self.num_empty else ()
        blocks = empty + tuple(Block(b.size + num, b.num_jets) for b in self.blocks)
        slots = _real_slots(~mask, self.jet_order, self.num_tracks + batch_size * num)
        jet = torch.div(slots, width, rounding_mode="floor")
        pos = slots % width
        is_track = pos < num_slots
        # the packed row of every real track slot b * T + t
        row_of_slot = torch.zeros(batch_size * num_slots, dtype=torch.long, device=mask.device)
        row_of_slot.index_copy_(0, self.slot, torch.arange(self.num_tracks, device=mask.device))
        track_source = row_of_slot[jet * num_slots + pos.clamp(max=num_slots - 1)]
        token_source = self.num_tracks + jet * num + (pos - num_slots).clamp(min=0)
        order = torch.where(is_track, track_source, token_source)
        inverse = torch.empty_like(order)
        inverse.index_copy_(0, order, torch.arange(len(order), device=mask.device))
        seq = Packing(mask, self.jet_order, slots, 0, blocks, inverse[: self.num_tracks])
        return seq, order

    def tracks(self, x: Tensor) -> Tensor:
        """The track rows of packed `x` (all rows, unless made by `append_tokens`)."""
        return x if self.track_rows is None else x.index_select(0, self.track_rows)

    @cached_property
    def cu_seqlens(self) -> Tensor:
        """int32 `[B + 1]`: where each jet's rows start (jets in `jet_order`), then N; the
        sequence boundaries of varlen attention."""
        lengths = (~self.pad_mask).sum(dim=1).index_select(0, self.jet_order)
        return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

    @property
    def num_tracks(self) -> int:
        """N, the number of real tracks (packed rows)."""
        return self.slot.shape[0]

    def pack(self, x: Tensor) -> Tensor:
        """`x[B, T, ...]` -> its real-track rows `[N, ...]`."""
        return x.flatten(0, 1).index_select(0, self.slot)

    def unpack(self, x: Tensor) -> Tensor:
        """Packed rows `x[N, ...]` -> `[B, T, ...]`, zero in the padded slots."""
        batch_size, num_slots = self.pad_mask.shape
        out = x.new_zeros((batch_size * num_slots, *x.shape[1:]))
        return out.index_copy_(0, self.slot, x).unflatten(0, (batch_size, num_slots))

    def per_track(self, x: Tensor) -> Tensor:
        """Per-jet rows `x[B, ...]` -> `[N, ...]`: every track gets its jet's row."""
        sizes = [self.num_empty] + [b.num_jets for b in self.blocks]
        per_block = torch.split(x.index_select(0, self.jet_order), sizes)[1:]
        # broadcast views per block: the gradient is a plain sum over each jet's tracks
        parts = [
            jets.unsqueeze(1).expand(-1, b.size, *x.shape[1:]).flatten(0, 1)
            for jets, b in zip(per_block, self.blocks, strict=True)
        ]
        return _cat_rows(parts)

    def split(self, x: Tensor) -> list[Tensor]:
        """Packed rows `x[N, ...]` -> one `[jets, n, ...]` view per block."""
        rows = torch.split(x, [b.size * b.num_jets for b in self.blocks])
        return [
            part.unflatten(0, (b.num_jets, b.size))
            for part, b in zip(rows, self.blocks, strict=True)
        ]

    def merge(self, parts: list[Tensor]) -> Tensor:
        """Inverse of `split`: per-block `[jets, n, ...]` tensors -> packed rows `[N, ...]`."""
        return _cat_rows([p.flatten(0, 1) for p in parts])

    def pairwise(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        """`x_i[i] + x_j[j]` for every ordered pair of tracks of the same jet: `[P, ...]`.

        Pairs are ordered by block, jet, i, j (see `unpack_pairs`).
        """
        parts = [
            (a.unsqueeze(2) + b.unsqueeze(1)).flatten(0, 2)
            for a, b in zip(self.split(x_i), self.split(x_j), strict=True)
        ]
        return _cat_rows(parts)

    @cached_property
    def pair_slot(self) -> Tensor:
        """Flat index `(b * T + i) * T + j` of each pair of `pairwise` in a `[B, T, T]`."""
        num_slots = self.pad_mask.shape[1]
        parts = [
            (s.unsqueeze(2) * num_slots + (s % num_slots).unsqueeze(1)).flatten()
            for s in self.split(self.slot)
        ]
        return _cat_rows(parts)

    def unpack_pairs(self, x: Tensor) -> Tensor:
        """Pair values `x[P]` (from `pairwise`) -> `[B, T, T]`, zero for padded pairs."""
        batch_size, num_slots = self.pad_mask.shape
        out = x.new_zeros(batch_size * num_slots * num_slots)
        return out.index_copy_(0, self.pair_slot, x).view(batch_size, num_slots, num_slots)


def jets_per_multiplicity(pad_mask: Tensor) -> list[int]:
    """How many jets of `pad_mask[B, T]` have 0, 1, ..., T real tracks (a host list).

    Computed where the mask lives: on a CPU batch before it goes to the GPU, it costs no sync.
    """
    per_jet = (~pad_mask).sum(dim=1)
    # not bincount: CUDA's is flagged nondeterministic
    sizes = torch.arange(pad_mask.shape[1] + 1, device=pad_mask.device)
    return (per_jet.unsqueeze(1) == sizes).sum(dim=0).tolist()


def _real_slots(real: Tensor, jet_order: Tensor, count: int) -> Tensor:
    """Flat slot indices `b * T + t` of the `count` real slots of `real[B, T]`, jets in
    `jet_order`, slots in order within a jet."""
    num_slots = real.shape[1]
    in_order = real.index_select(0, jet_order).flatten()  # (position in jet_order) * T + t
    in_order = torch.nonzero_static(in_order, size=count).squeeze(1)
    position = torch.div(in_order, num_slots, rounding_mode="floor")
    return jet_order.index_select(0, position) * num_slots + in_order % num_slots


def _cat_rows(parts: list[Tensor]) -> Tensor:
    """Concatenate per-block tensors along rows (no copy for a single block)."""
    if not parts:
        raise ValueError("a Packing without real tracks has no blocks to join")
    return parts[0] if len(parts) == 1 else torch.cat(parts)
