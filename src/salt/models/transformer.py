"""Transformer encoder over the tracks of a jet: pre-norm self-attention layers.

Each layer is `x + attn(norm(x))` then `x + ff(norm(x))`; after the last layer come a final
norm and an output projection (`embed_dim -> out_dim`). Padded tracks never act as keys, so
real-track outputs do not depend on them; padded outputs are set to zero. `forward_packed`
computes the same on the real tracks only (see `salt.models.packing`).
"""

from __future__ import annotations

from torch import Tensor, nn

from salt.models.attention import MultiheadAttention
from salt.models.dense import Dense
from salt.models.dropout import Dropout
from salt.models.packing import Packing


class EncoderLayer(nn.Module):
    """One pre-norm transformer layer: self-attention and feed-forward, both residual."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attention: str = "scaled_dot_product",
        attention_dropout: float = 0.0,
        negative_slope: float = 0.2,
        ff_hidden_scale: int = 2,
        activation: str = "SiLU",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.attn = MultiheadAttention(
            embed_dim,
            num_heads,
            score=attention,
            dropout=attention_dropout,
            negative_slope=negative_slope,
        )
        self.ff_norm = nn.LayerNorm(embed_dim)
        self.ff = Dense(
            embed_dim,
            embed_dim,
            hidden_layers=[ff_hidden_scale * embed_dim],
            activation=activation,
            norm=None,
            dropout=dropout,
        )
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), kv_mask=pad_mask))
        return x + self.dropout(self.ff(self.ff_norm(x)))

    def forward_packed(self, x: Tensor, packing: Packing) -> Tensor:
        """The same layer on packed tracks `x[N, embed_dim]` (see `Packing`)."""
        x = x + self.dropout(self.attn.forward_packed(self.attn_norm(x), packing))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class TransformerEncoder(nn.Module):
    """`num_layers` encoder layers, a final LayerNorm and a projection to `out_dim`."""

    def __init__(
        self,
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        out_dim: int | None = None,
        attention: str = "scaled_dot_product",
        attention_dropout: float = 0.0,
        negative_slope: float = 0.2,
        ff_hidden_scale: int = 2,
        activation: str = "SiLU",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.out_dim = embed_dim if out_dim is None else out_dim
        self.layers = nn.ModuleList(
            EncoderLayer(
                embed_dim,
                num_heads,
                attention=attention,
                attention_dropout=attention_dropout,
                negative_slope=negative_slope,
                ff_hidden_scale=ff_hidden_scale,
                activation=activation,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.out_proj = (
            nn.Identity() if self.out_dim == embed_dim else nn.Linear(embed_dim, self.out_dim)
        )

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """`x[B, T, embed_dim]`, `pad_mask[B, T]` (True = padded) -> `[B, T, out_dim]`."""
        for layer in self.layers:
            x = layer(x, pad_mask)
        x = self.out_proj(self.norm(x))
        return x.masked_fill(pad_mask.unsqueeze(-1), 0.0)

    def forward_packed(self, x: Tensor, packing: Packing) -> Tensor:
        """The same encoder on packed tracks: `x[N, embed_dim]` -> `[N, out_dim]`."""
        for layer in self.layers:
            x = layer.forward_packed(x, packing)
        return self.out_proj(self.norm(x))
