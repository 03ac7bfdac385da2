"""Transformer encoder over the tracks of a jet: self-attention and feed-forward layers.

As the old tool's (salt-ml) `Transformer`, which defines GN2 and GN3:

- `num_registers` learned tokens (registers) are appended to every jet's tracks. They attend
  and are attended to, so a jet without tracks still has something to attend to, and they
  are part of what the pooling sees; the track tasks leave them out.
- where the norms go (`norm_type`), with `n` the layer's norms:
  - `pre` (GN1/GN2): `x + attn(n(x))` then `x + ff(n(x))`: the residual stream itself is
    never normalised;
  - `post` (the original transformer's): `n(x + attn(x))` then `n(x + ff(x))`;
  - `hybrid` (the old tool's GN3): the first layer as `pre`; every later one `x + attn(x)`,
    then `x = n(x)`, then `x + ff(x)`: the stream is normalised once per layer, between
    attention and feed-forward. Every layer's attention normalises each head's queries, keys
    and values (the old tool's `do_qk_norm`, `do_v_norm`), which keeps the un-normalised
    attention input stable. Those head norms are of the encoder's `norm` kind and
    `norm_affine` (the old tool's are always RMSNorms with a learned scale: the same for its
    GN3 configs, `norm: RMSNorm` here with `norm_affine: true`).
- after the last layer: the output projection (`embed_dim -> out_dim`), then a final norm,
  so every token the pooling and the task heads see has unit scale.
- norms are LayerNorms (`norm`: or RMSNorms, `salt.models.norms`) without learned scale and
  shift (`norm_affine: false`) by default.
- the feed-forward block is `W2 act(W1 x)`, or gated (`gated`: `W2 (act(W1 x) * W3 x)`,
  SwiGLU with SiLU; `salt.models.feed_forward`).

With `model.edges` (`salt.models.edges`), an `EdgeBias` turns the objects' pair features into
a bias of every layer's attention logits (or the first layer's): the registers' pairs get 0.

Padded tracks never act as keys, so real-track outputs do not depend on them; padded outputs
are set to zero. `forward_packed` computes the same on the real tracks (and the registers)
only (see `salt.models.packing`): every norm acts on one token at a time, so placement and
norm kind leave that equality as it is.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from salt.models.attention import MultiheadAttention
from salt.models.dropout import Dropout
from salt.models.edges import EdgeBias
from salt.models.feed_forward import make_feed_forward
from salt.models.norms import Norm, make_norm
from salt.models.packing import Packing
from salt.utils import typed_config as check

_Bias = Tensor | list[Tensor] | None  # an edge bias: padded, or one per block of a packing


class NormType(enum.StrEnum):
    """Where an encoder layer's norms go (the module docstring; the old tool's `norm_type`)."""

    pre = "pre"
    post = "post"
    hybrid = "hybrid"


@dataclass
class EncoderConfig:
    """`model.encoder` (the attention settings are `model.attention`)."""

    num_layers: int = 4
    out_dim: int | None = None  # projection after the last layer (None: keep embed_dim)
    ff_hidden_scale: int = 2  # feed-forward hidden size = ff_hidden_scale x embed_dim
    dropout: float = 0.0
    activation: str = "SiLU"
    num_registers: int = 1  # learned tokens appended to every jet's tracks (0: none)
    norm: Norm = Norm.LayerNorm  # the encoder's norms: LayerNorm | RMSNorm
    norm_type: NormType = NormType.pre  # where they go: pre | post | hybrid
    norm_affine: bool = False  # learned scale (LayerNorm: and shift) in the encoder's norms
    gated: bool = False  # gated feed-forward W2 (act(W1 x) * W3 x) (SwiGLU with SiLU)

    def check(self, where: str) -> None:
        check.positive(self.num_layers, f"{where}.num_layers")
        check.positive(self.out_dim, f"{where}.out_dim", allow_none=True)
        check.positive(self.ff_hidden_scale, f"{where}.ff_hidden_scale")
        check.fraction(self.dropout, f"{where}.dropout")
        check.activation(self.activation, f"{where}.activation")
        check.at_least(self.num_registers, f"{where}.num_registers", 0)


class EncoderLayer(nn.Module):
    """One transformer layer: self-attention and feed-forward, both residual, with norms
    placed as `norm_type` says (the module docstring). `first`: the encoder's first layer
    (a `hybrid` one pre-norms like `pre`)."""

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
        norm_affine: bool = False,
        norm: str = Norm.LayerNorm,
        norm_type: str = NormType.pre,
        gated: bool = False,
        first: bool = True,
    ) -> None:
        super().__init__()
        self.norm_type = NormType(norm_type)
        hybrid = self.norm_type == NormType.hybrid
        # a later hybrid layer leaves the attention's input as it is; `ff_norm` then
        # normalises the stream itself (`normed_stream`)
        self.normed_stream = hybrid and not first
        # created in the same order as ever (norm, attention, norm, feed-forward): a default
        # encoder draws the same initial weights from the same seed
        self.attn_norm = None if self.normed_stream else make_norm(norm, embed_dim, norm_affine)
        self.attn = MultiheadAttention(
            embed_dim,
            num_heads,
            score=attention,
            dropout=attention_dropout,
            negative_slope=negative_slope,
            head_norm=norm if hybrid else None,
            head_norm_affine=norm_affine,
        )
        self.ff_norm = make_norm(norm, embed_dim, norm_affine)
        hidden = ff_hidden_scale * embed_dim
        self.ff = make_feed_forward(embed_dim, hidden, activation, dropout, gated)
        self.dropout = Dropout(dropout)
        self._feed_forward = self.feed_forward  # `compile_feed_forward` swaps in a compiled one

    def attention_block(self, x: Tensor, attend: Callable[[Tensor], Tensor]) -> Tensor:
        """The residual self-attention block; `attend` maps the attention's input to its
        output (padded or packed)."""
        if self.norm_type == NormType.post:
            assert self.attn_norm is not None
            return self.attn_norm(x + self.dropout(attend(x)))
        h = x if self.attn_norm is None else self.attn_norm(x)
        return x + self.dropout(attend(h))

    def feed_forward(self, x: Tensor) -> Tensor:
        """The residual feed-forward block: per track, so the same on any layout."""
        if self.norm_type == NormType.post:
            return self.ff_norm(x + self.dropout(self.ff(x)))
        if self.normed_stream:
            x = self.ff_norm(x)
            return x + self.dropout(self.ff(x))
        return x + self.dropout(self.ff(self.ff_norm(x)))

    def compile_feed_forward(self, backend: str = "inductor") -> None:
        """torch.compile the feed-forward block alone (dynamic track count): for the packed
        layouts, whose attention has data-dependent structure that compiling would recompile
        for every batch."""
        self._feed_forward = torch.compile(self.feed_forward, dynamic=True, backend=backend)

    def forward(self, x: Tensor, pad_mask: Tensor, bias: Tensor | None = None) -> Tensor:
        """`bias[B, H, T, T]`: added to the attention logits (edge features)."""
        x = self.attention_block(x, lambda h: self.attn(h, kv_mask=pad_mask, bias=bias))
        return self._feed_forward(x)

    def forward_packed(
        self,
        x: Tensor,
        packing: Packing,
        varlen: bool = False,
        bias: list[Tensor] | None = None,
    ) -> Tensor:
        """The same layer on packed tracks `x[N, embed_dim]` (see `Packing`); `bias`: one per
        block of `packing`."""
        x = self.attention_block(
            x, lambda h: self.attn.forward_packed(h, packing, varlen, bias=bias)
        )
        return self._feed_forward(x)


class TransformerEncoder(nn.Module):
    """Registers, `num_layers` encoder layers, a projection to `out_dim` and a final norm;
    with `edge_bias`, the objects' pair features as a bias of the attention logits."""

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
        num_registers: int = 1,
        norm_affine: bool = False,
        norm: str = Norm.LayerNorm,
        norm_type: str = NormType.pre,
        gated: bool = False,
        edge_bias: EdgeBias | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.out_dim = embed_dim if out_dim is None else out_dim
        self.num_registers = int(num_registers)
        self.attention_type = attention
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
                norm_affine=norm_affine,
                norm=norm,
                norm_type=norm_type,
                gated=gated,
                first=i == 0,
            )
            for i in range(num_layers)
        )
        self.out_proj = (
            nn.Identity() if self.out_dim == embed_dim else nn.Linear(embed_dim, self.out_dim)
        )
        self.norm = make_norm(norm, self.out_dim, norm_affine)
        # tiny, so the registers start as near-empty tokens (as the old tool's)
        self.registers = (
            nn.Parameter(torch.randn(self.num_registers, embed_dim) * 1e-4)
            if self.num_registers
            else None
        )
        # registered last (built by the caller, `build_tagger`: after every other part, so the
        # rest of a model with edges starts from the weights it has without them)
        self.edge_bias = edge_bias

    def _check_edges(self, edges: Tensor | None) -> None:
        if (edges is None) != (self.edge_bias is None):
            raise ValueError(
                "the encoder's edge inputs and its edge bias go together: "
                f"edges {'given' if edges is not None else 'missing'}, edge bias "
                f"{'built' if self.edge_bias is not None else 'not built'}"
            )

    def forward(
        self, x: Tensor, pad_mask: Tensor, edges: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`x[B, T, embed_dim]`, `pad_mask[B, T]` (True = padded) -> the tracks then the
        registers, `[B, T + num_registers, out_dim]`, and their pad mask. `edges[B, T, C]`:
        the objects' edge inputs (`salt.models.edges.EdgeInputs`), with an edge bias."""
        self._check_edges(edges)
        if self.registers is not None:
            batch = x.shape[0]
            x = torch.cat([x, self.registers.to(x.dtype).expand(batch, -1, -1)], dim=1)
            pad_mask = torch.cat([pad_mask, pad_mask.new_zeros(batch, self.num_registers)], 1)
            if edges is not None:  # registers have no kinematics: no bias on their pairs
                extra = edges.new_zeros(batch, self.num_registers, edges.shape[-1])
                edges = torch.cat([edges, extra], dim=1)
        bias = None
        if self.edge_bias is not None:
            assert edges is not None
            bias = self.edge_bias.padded(edges, pad_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, pad_mask, self._layer_bias(bias, i))
        x = self.norm(self.out_proj(x))
        return x.masked_fill(pad_mask.unsqueeze(-1), 0.0), pad_mask

    def forward_packed(
        self, x: Tensor, packing: Packing, varlen: bool = False, edges: Tensor | None = None
    ) -> tuple[Tensor, Packing]:
        """The same encoder on packed tracks `x[N, embed_dim]`: the packed tracks and
        registers `[N + B * num_registers, out_dim]` and their packing (see
        `Packing.append_tokens`; its `tracks()` selects the track rows). `varlen`: the
        self-attention in one varlen call (see `MultiheadAttention.forward_packed`).
        `edges[N, C]`: the packed objects' edge inputs, with an edge bias (not with varlen)."""
        self._check_edges(edges)
        if self.registers is not None:
            packing, order = packing.append_tokens(self.num_registers)
            batch = packing.pad_mask.shape[0]
            tokens = self.registers.to(x.dtype).expand(batch, -1, -1)
            x = torch.cat([x, tokens.flatten(0, 1)]).index_select(0, order)
            if edges is not None:
                extra = edges.new_zeros(batch * self.num_registers, *edges.shape[1:])
                edges = torch.cat([edges, extra]).index_select(0, order)
        bias = None
        if self.edge_bias is not None:
            assert edges is not None
            bias = self.edge_bias.packed(edges, packing)
        for i, layer in enumerate(self.layers):
            x = layer.forward_packed(x, packing, varlen, self._layer_bias(bias, i))
        return self.norm(self.out_proj(x)), packing

    def _layer_bias(self, bias: _Bias, index: int) -> _Bias:
        """The edge bias layer `index` adds: every layer's, or the first's only."""
        if self.edge_bias is None or (index and not self.edge_bias.every_layer):
            return None
        return bias
