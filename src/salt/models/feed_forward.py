"""The encoder's feed-forward block: plain (`W2 act(W1 x)`) or gated (`model.encoder.gated`).

Gated is a gated linear unit (Shazeer 2020, arXiv:2002.05202), `W2 (act(W1 x) * W3 x)`:
with SiLU, SwiGLU, as the old tool's GN3 configs use it (`dense_kwargs: {gated: True}`).
The hidden size stays `ff_hidden_scale x embed_dim` either way, as in the old tool, so gating
adds the third matrix: 3 E H weights and 2 H + E biases against 2 E H and H + E, i.e. 1.5x
the block's parameters (LLaMA instead shrinks H by 2/3 to keep the count; we do not).
"""

from __future__ import annotations

from torch import Tensor, nn

from salt.models.dense import Dense, activation_layer
from salt.models.dropout import Dropout


class GatedFeedForward(nn.Module):
    """`out_proj(dropout(act(a) * g))` with `[a; g] = in_proj(x)`: W1 and W3 as one `[2H, E]`
    matrix (one product), the activated half first."""

    def __init__(
        self, embed_dim: int, hidden_dim: int, activation: str = "SiLU", dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, 2 * hidden_dim)
        self.activation = activation_layer(activation)
        self.dropout = Dropout(dropout)
        self.out_proj = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.in_proj(x).chunk(2, dim=-1)
        return self.out_proj(self.dropout(self.activation(a) * g))


def make_feed_forward(
    embed_dim: int, hidden_dim: int, activation: str, dropout: float, gated: bool
) -> nn.Module:
    """The block `embed_dim -> hidden_dim -> embed_dim` (no norm inside: the encoder layer
    places its own)."""
    if gated:
        return GatedFeedForward(embed_dim, hidden_dim, activation, dropout)
    return Dense(
        embed_dim,
        embed_dim,
        hidden_layers=[hidden_dim],
        activation=activation,
        norm=None,
        dropout=dropout,
    )
