"""Pooling: one vector per jet from its track representations.

- `global_attention`: a learned gate scores every track; the softmax over the real tracks
  weights a sum of the track vectors.
- `cross_attention`: a learned class token attends to the tracks through `num_layers`
  pre-norm cross-attention blocks (attention + feed-forward, residual).

A jet without real tracks pools to a fixed vector (zero, or the class token's path without
attention messages), never NaN. `forward_packed` takes packed tracks (`salt.models.packing`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from salt.models.attention import AttentionConfig, MultiheadAttention, masked_softmax
from salt.models.dense import Dense, DenseConfig
from salt.models.packing import Packing
from salt.utils import typed_config as check


class PoolingType(enum.StrEnum):
    global_attention = "global_attention"
    cross_attention = "cross_attention"


@dataclass
class PoolingConfig:
    """`model.pooling`. Hydra's `pooling=` group merges into the model's node, so the
    cross-attention keys may be left over under global_attention: they are then unused."""

    type: PoolingType = MISSING
    # cross_attention
    num_layers: int = 2
    out_dim: int | None = None  # pooled jet vector size; None: the encoder out_dim
    attention: AttentionConfig | None = None
    dense: DenseConfig = field(default_factory=DenseConfig)  # each block's feed-forward

    def check(self, where: str) -> None:
        if self.type != PoolingType.cross_attention:
            return
        check.positive(self.num_layers, f"{where}.num_layers")
        check.positive(self.out_dim, f"{where}.out_dim", allow_none=True)
        if self.attention is None:
            raise check.ConfigError(f"{where}.attention: cross_attention pooling needs one")
        self.attention.check(f"{where}.attention")
        self.dense.check(f"{where}.dense")


class GlobalAttentionPooling(nn.Module):
    """Gated sum: `sum_j softmax_j(w . x_j + b) x_j` over the real tracks j."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = self.output_size = input_size
        self.gate = nn.Linear(input_size, 1)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """`x[B, T, D]`, `pad_mask[B, T]` -> `[B, D]`."""
        weights = masked_softmax(self.gate(x).squeeze(-1), pad_mask)
        return torch.einsum("bt,btd->bd", weights, x)

    def forward_packed(self, x: Tensor, packing: Packing) -> Tensor:
        """Packed tracks `x[N, D]` (see `Packing`) -> `[B, D]`."""
        return self(packing.unpack(x), packing.pad_mask)


class CrossAttentionBlock(nn.Module):
    """`c + attn(norm(c), norm(x))` then `c + ff(norm(c))` for class token(s) `c`."""

    def __init__(
        self,
        embed_dim: int,
        kv_dim: int,
        num_heads: int,
        attention: str,
        attention_dropout: float,
        negative_slope: float,
        hidden_layers: list[int],
        activation: str,
        norm: str | None,
        dropout: float,
    ) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(embed_dim)
        self.kv_norm = nn.LayerNorm(kv_dim)
        self.attn = MultiheadAttention(
            embed_dim,
            num_heads,
            score=attention,
            kv_dim=kv_dim,
            dropout=attention_dropout,
            negative_slope=negative_slope,
        )
        self.ff_norm = nn.LayerNorm(embed_dim)
        self.ff = Dense(embed_dim, embed_dim, hidden_layers, activation, norm, dropout)

    def forward(self, c: Tensor, x: Tensor, pad_mask: Tensor) -> Tensor:
        c = c + self.attn(self.q_norm(c), self.kv_norm(x), kv_mask=pad_mask)
        return c + self.ff(self.ff_norm(c))

    def forward_packed(self, c: Tensor, x: Tensor, packing: Packing) -> Tensor:
        """The same block with packed tracks `x[N, kv_dim]` (see `Packing`)."""
        c = c + self.attn.forward_packed_kv(self.q_norm(c), self.kv_norm(x), packing)
        return c + self.ff(self.ff_norm(c))


class CrossAttentionPooling(nn.Module):
    """A learnable class token attends to the tracks through `num_layers` blocks.

    Keys and values come from the tracks (`input_size`); the class token, every attention
    and the output have size `output_size` (heads are resolved against it).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        num_layers: int,
        num_heads: int,
        attention: str = "scaled_dot_product",
        attention_dropout: float = 0.0,
        negative_slope: float = 0.2,
        hidden_layers: list[int] | None = None,
        activation: str = "SiLU",
        norm: str | None = "LayerNorm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.class_token = nn.Parameter(torch.empty(1, 1, output_size))
        nn.init.trunc_normal_(self.class_token, std=0.02)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(
                output_size,
                input_size,
                num_heads,
                attention,
                attention_dropout,
                negative_slope,
                list(hidden_layers or []),
                activation,
                norm,
                dropout,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(output_size)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """`x[B, T, input_size]`, `pad_mask[B, T]` -> `[B, output_size]`."""
        c = self.class_token.expand(x.shape[0], -1, -1)
        for block in self.blocks:
            c = block(c, x, pad_mask)
        return self.norm(c).squeeze(1)

    def forward_packed(self, x: Tensor, packing: Packing) -> Tensor:
        """Packed tracks `x[N, input_size]` (see `Packing`) -> `[B, output_size]`."""
        c = self.class_token.expand(packing.pad_mask.shape[0], -1, -1)
        for block in self.blocks:
            c = block.forward_packed(c, x, packing)
        return self.norm(c).squeeze(1)
