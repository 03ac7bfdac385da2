"""Padding-aware multi-head attention with a pluggable score.

Scores (the `type` of an attention config node):

- `scaled_dot_product`: softmax(q k^T / sqrt(d)) through `F.scaled_dot_product_attention`.
- `gatv2`: per head `e_ij = a . LeakyReLU(W_q x_i + W_k x_j)` (Brody et al., GATv2),
  softmax over the real keys j, messages `W_v x_j`.

Padding: padded keys (`kv_mask` True) never influence any query. A query whose keys are all
padded (a jet with no real tracks) receives a zero message instead of the NaN a softmax over
nothing gives; its gradients stay finite. Queries and keys may come from different sets
(cross-attention: a class token attending to the tracks).

`bias` (self-attention only: `model.edges`, `salt.models.edges`): a float `[B, H, Tq, Tk]` added
to every head's logits (scaled dot-product: after the 1/sqrt(d) scaling; GATv2: to its scores);
padded keys stay excluded (-inf). The packed layout takes it per block of equal-multiplicity
jets (`[jets, H, n, n]`); the varlen kernel takes none.

`head_norm` (the encoder's hybrid norm placement, `salt.models.transformer`) normalises the
queries, keys and values of every head over head_dim after their projections (QK-norm and
V-norm, as the old tool's hybrid layers do): per row and head, so the same on every layout.

Self-attention over packed tracks (`forward_packed`) has two cores computing the same math:
per block of equal-multiplicity jets (no padding, one call per multiplicity: fast on CPU), or
`varlen`: one call over all jets given their cumulative lengths, torch's flash varlen kernel
on CUDA in fp16/bf16 (`torch.nn.attention.varlen`, torch >= 2.9), elsewhere a reference on
the padded layout with the same result.
"""

from __future__ import annotations

import contextlib
import enum
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor, nn

from salt.errors import ModelConfigError
from salt.models.norms import make_norm
from salt.models.packing import Packing
from salt.utils import typed_config as check


class AttentionType(enum.StrEnum):
    scaled_dot_product = "scaled_dot_product"
    gatv2 = "gatv2"


class Backend(enum.StrEnum):
    """How the encoder's self-attention is computed, all the same math (salt.models.tagger)."""

    auto = "auto"
    packed = "packed"
    varlen = "varlen"
    padded = "padded"


ATTENTION_TYPES = tuple(AttentionType)
ATTENTION_BACKENDS = tuple(Backend)


@dataclass
class AttentionConfig:
    """An attention node (`model.attention`, `model.pooling.attention`). Hydra's `attention=`
    group merges into the model's node, so `negative_slope` may be left over from gatv2 under
    another type: it is then unused."""

    type: AttentionType = MISSING
    num_heads: int | None = None  # or head_dim: the other follows from the embedding size
    head_dim: int | None = None
    dropout: float = 0.0
    negative_slope: float = 0.2  # gatv2's LeakyReLU slope

    def check(self, where: str) -> None:
        for key in ("num_heads", "head_dim"):
            check.positive(getattr(self, key), f"{where}.{key}", allow_none=True)
        if self.num_heads is None and self.head_dim is None:
            raise ModelConfigError(f"{where}: set num_heads or head_dim (the other follows)")
        check.fraction(self.dropout, f"{where}.dropout")
        check.at_least(self.negative_slope, f"{where}.negative_slope", 0.0)


@dataclass
class SelfAttentionConfig(AttentionConfig):
    """The encoder's self-attention (`model.attention`): also how it is computed."""

    backend: Backend = Backend.auto

    def check(self, where: str) -> None:
        super().check(where)
        if self.backend == Backend.varlen and self.type != AttentionType.scaled_dot_product:
            raise ModelConfigError(
                f"{where}.backend=varlen needs scaled_dot_product attention (the flash "
                f"kernel computes no {self.type} scores); use auto, packed or padded"
            )


@functools.cache  # asked on every forward: look it up once
def varlen_kernel() -> Callable[..., Tensor] | None:
    """torch's flash varlen attention (`varlen_attn`), or None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_kernel_runs(x: Tensor, head_dim: int) -> bool:
    """Whether the flash varlen kernel takes `x`: CUDA, fp16/bf16, head_dim a multiple of 8
    up to 256 (flash attention's limits)."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and varlen_kernel() is not None
    )


def resolve_heads(
    embed_dim: int, num_heads: int | None, head_dim: int | None, where: str
) -> tuple[int, int]:
    """Return (num_heads, head_dim) with num_heads * head_dim == embed_dim.

    The config gives one of the two (the other is derived) or both consistently; anything
    else is a ModelConfigError naming `where` and the values.
    """
    for key, value in (("num_heads", num_heads), ("head_dim", head_dim)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ModelConfigError(f"{where}.{key} must be a positive int or null, got {value!r}")
    if num_heads is None and head_dim is None:
        raise ModelConfigError(
            f"{where}: set num_heads or head_dim (the other follows from the embedding "
            f"dimension {embed_dim})"
        )
    if num_heads is not None and head_dim is not None:
        if num_heads * head_dim != embed_dim:
            raise ModelConfigError(
                f"{where}: num_heads={num_heads} x head_dim={head_dim} = {num_heads * head_dim}"
                f" does not equal the embedding dimension {embed_dim}; set only one of "
                f"num_heads / head_dim and the other is derived"
            )
        return num_heads, head_dim
    given_key, given = ("num_heads", num_heads) if num_heads is not None else ("head_dim", head_dim)
    assert given is not None
    if embed_dim % given:
        raise ModelConfigError(
            f"{where}: the embedding dimension {embed_dim} is not divisible by {given_key}={given}"
        )
    other = embed_dim // given
    return (given, other) if given_key == "num_heads" else (other, given)


def masked_softmax(scores: Tensor, pad_mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over the entries where `pad_mask` (broadcastable, True = padded) is False.

    Padded entries get weight 0; a row with no real entry gets all-zero weights (not NaN).
    """
    empty = pad_mask.all(dim=dim, keepdim=True)
    # Rows without any real entry keep finite scores so the softmax stays finite; their
    # weights are zeroed below with all other padded entries.
    scores = scores.masked_fill(pad_mask & ~empty, float("-inf"))
    return torch.softmax(scores, dim=dim).masked_fill(pad_mask, 0.0)


@contextlib.contextmanager
def _attention_precision(x: Tensor) -> Iterator[torch.dtype]:
    """The dtype for the attention core on `x` (the projections), autocast off inside.

    On CPU, torch's bf16/fp16 attention backward is several times slower than fp32, so the
    (small) attention core runs in fp32 there; elsewhere in the projections' dtype.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        yield x.dtype
        return
    with torch.autocast("cpu", enabled=False):
        yield torch.float32


class GATv2Score(nn.Module):
    """GATv2 attention scores per head: `e_ij = a_h . LeakyReLU(q_i + k_j)`."""

    def __init__(self, num_heads: int, head_dim: int, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        """Scores `[B, H, Tq, Tk]` from projected queries `[B, H, Tq, D]`, keys `[B, H, Tk, D]`."""
        pairs = F.leaky_relu(q.unsqueeze(-2) + k.unsqueeze(-3), self.negative_slope)
        # [B, H, Tq, Tk, D] @ [H, 1, D, 1] -> [B, H, Tq, Tk, 1]
        return torch.matmul(pairs, self.weight[:, None, :, None]).squeeze(-1)


def _init_in_projection(linear: nn.Linear, fan_out: int) -> None:
    """Xavier-uniform weight and zero bias, as one slice of a packed `[3E, in]` q/k/v
    projection (the old tool's init, which GN2 was tuned with)."""
    bound = (6.0 / (linear.in_features + fan_out)) ** 0.5
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)


class MultiheadAttention(nn.Module):
    """Multi-head attention: project, score per head, weight the values, project out.

    `embed_dim` is the query (and output) size and the total size of all heads
    (`num_heads * head_dim`); keys and values may have another size (`kv_dim`). `head_norm`
    (a `salt.models.norms` name, or None): normalise each head's q, k and v.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        score: str = "scaled_dot_product",
        kv_dim: int | None = None,
        dropout: float = 0.0,
        negative_slope: float = 0.2,
        head_norm: str | None = None,
        head_norm_affine: bool = False,
    ) -> None:
        super().__init__()
        if score not in ATTENTION_TYPES:
            raise ModelConfigError(
                f"attention type {score!r} unknown; choose from {ATTENTION_TYPES}"
            )
        num_heads, head_dim = resolve_heads(embed_dim, num_heads, None, "attention")
        kv_dim = embed_dim if kv_dim is None else kv_dim
        self.embed_dim, self.kv_dim = embed_dim, kv_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.score_type = score
        self.dropout = float(dropout)
        self.linear_q = nn.Linear(embed_dim, embed_dim)
        self.linear_k = nn.Linear(kv_dim, embed_dim)
        self.linear_v = nn.Linear(kv_dim, embed_dim)
        self.linear_out = nn.Linear(embed_dim, embed_dim)
        self.gatv2 = GATv2Score(num_heads, head_dim, negative_slope) if score == "gatv2" else None
        for linear in (self.linear_q, self.linear_k, self.linear_v):
            _init_in_projection(linear, 3 * embed_dim)
        # after the projections' init: a model without them draws the same weights
        self.head_norms = (
            nn.ModuleList(make_norm(head_norm, head_dim, head_norm_affine) for _ in "qkv")
            if head_norm is not None
            else None
        )

    def _norm_heads(self, x: Tensor, which: int) -> Tensor:
        """Projected `x[..., H*D]` with each head normalised by norm `which` (0 q, 1 k, 2 v)."""
        if self.head_norms is None:
            return x
        norm = self.head_norms[which]
        return norm(x.unflatten(-1, (self.num_heads, self.head_dim))).flatten(-2)

    def _norm_joined(self, x: Tensor, first: int) -> Tensor:
        """Joined projections (`[q; k; v]`: first=0, `[k; v]`: first=1) with each head
        normalised."""
        if self.head_norms is None:
            return x
        parts = x.chunk(3 - first, dim=-1)
        return torch.cat([self._norm_heads(p, i) for i, p in enumerate(parts, start=first)], -1)

    def _heads(self, x: Tensor) -> Tensor:
        """`[B, T, H*D] -> [B, H, T, D]`."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        q: Tensor,
        kv: Tensor | None = None,
        kv_mask: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """Attend from `q[B, Tq, E]` to `kv[B, Tk, kv_dim]` (self-attention when kv is None).

        `kv_mask[B, Tk]` is True for padded keys; `bias[B, H, Tq, Tk]` is added to the logits.
        Returns `[B, Tq, E]`.
        """
        kv = q if kv is None else kv
        qh = self._heads(self._norm_heads(self.linear_q(q), 0))
        kh = self._heads(self._norm_heads(self.linear_k(kv), 1))
        vh = self._heads(self._norm_heads(self.linear_v(kv), 2))
        return self._output(self._attend(qh, kh, vh, kv_mask, bias), kv_mask)

    def forward_packed(
        self,
        x: Tensor,
        packing: Packing,
        varlen: bool = False,
        bias: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Self-attention of packed tracks `x[N, E]` (see `Packing`) -> `[N, E]`.

        Projections run on all tracks at once (one matrix product for q, k and v); the
        attention runs per block of jets with equal multiplicity, without padding, or with
        `varlen` in one call over all jets (see the module docstring). `bias`: one
        `[jets, H, n, n]` per block, added to the logits (not with varlen).
        """
        weight = torch.cat([self.linear_q.weight, self.linear_k.weight, self.linear_v.weight])
        bias_qkv = torch.cat([self.linear_q.bias, self.linear_k.bias, self.linear_v.bias])
        qkv = F.linear(x, weight, bias_qkv)  # [N, 3E]
        qkv = self._norm_joined(qkv, first=0)
        if varlen and self.gatv2 is None:
            if bias is not None:
                raise ValueError("varlen attention takes no logit bias; use packed or padded")
            return self.linear_out(self._attend_varlen(qkv, packing))
        messages = []
        with _attention_precision(qkv) as dtype:
            blocks = packing.split(qkv.to(dtype))  # [jets, n, 3E] each
            biases = [None] * len(blocks) if bias is None else [b.to(dtype) for b in bias]
            for block, block_bias in zip(blocks, biases, strict=True):
                qh, kh, vh = (self._heads(part) for part in block.chunk(3, dim=-1))
                messages.append(self._attend(qh, kh, vh, None, block_bias).to(qkv.dtype))
        return self.linear_out(packing.merge(messages))

    def _attend_varlen(self, qkv: Tensor, packing: Packing) -> Tensor:
        """Messages `[N, E]` of packed `qkv[N, 3E]`, every jet attending to its own rows."""
        dropout = self.dropout if self.training else 0.0
        if not dropout and varlen_kernel_runs(qkv, self.head_dim):
            kernel = varlen_kernel()
            assert kernel is not None
            q, k, v = (p.unflatten(-1, (self.num_heads, self.head_dim)) for p in qkv.chunk(3, -1))
            cu_seqlens, longest = packing.cu_seqlens, packing.pad_mask.shape[1]
            return kernel(q, k, v, cu_seqlens, cu_seqlens, longest, longest).flatten(-2)
        # the reference: the same attention on the padded layout (CPU, fp32, dropout)
        qh, kh, vh = (self._heads(p) for p in packing.unpack(qkv).chunk(3, dim=-1))
        return packing.pack(self._attend(qh, kh, vh, packing.pad_mask))

    def forward_packed_kv(self, q: Tensor, kv: Tensor, packing: Packing) -> Tensor:
        """Attend from per-jet queries `q[B, Tq, E]` to packed tracks `kv[N, kv_dim]`.

        The key and value projections run on the real tracks only. Returns `[B, Tq, E]`.
        """
        weight = torch.cat([self.linear_k.weight, self.linear_v.weight])
        bias = torch.cat([self.linear_k.bias, self.linear_v.bias])
        kv = self._norm_joined(F.linear(kv, weight, bias), first=1)  # [N, 2E]
        kh, vh = (self._heads(part) for part in packing.unpack(kv).chunk(2, -1))
        qh = self._heads(self._norm_heads(self.linear_q(q), 0))
        return self._output(self._attend(qh, kh, vh, packing.pad_mask), packing.pad_mask)

    def _attend(
        self,
        qh: Tensor,
        kh: Tensor,
        vh: Tensor,
        kv_mask: Tensor | None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """Messages `[B, Tq, E]` (heads merged) from heads `[B, H, T, D]`; padded keys ignored;
        `bias[B, H, Tq, Tk]` added to the logits.

        Queries whose keys are all padded get finite (meaningless) messages: see `_output`.
        """
        dropout = self.dropout if self.training else 0.0
        if self.gatv2 is not None:
            scores = self.gatv2(qh, kh)
            if bias is not None:
                scores = scores + bias.to(scores.dtype)
            if kv_mask is None:
                weights = torch.softmax(scores, dim=-1)
            else:
                weights = masked_softmax(scores, kv_mask[:, None, None, :])
            out = torch.matmul(F.dropout(weights, dropout, self.training), vh)
        else:
            attend = None  # SDPA's boolean mask (True = take part) or float one (added)
            if kv_mask is not None:
                # A row with nothing to attend gives NaN in some SDPA backends: such rows
                # attend to all (padded) keys here and their message is zeroed in `_output`.
                empty = kv_mask.all(dim=-1)
                attend = (~kv_mask | empty[:, None])[:, None, None, :]
            if bias is not None:
                bias = bias.to(qh.dtype)
                attend = bias if attend is None else bias.masked_fill(~attend, float("-inf"))
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attend, dropout_p=dropout)
        return out.transpose(1, 2).flatten(-2)

    def _output(self, messages: Tensor, kv_mask: Tensor | None) -> Tensor:
        """The output projection; zero for jets whose keys are all padded (no real track)."""
        out = self.linear_out(messages)
        if kv_mask is not None:
            out = out.masked_fill(kv_mask.all(dim=-1)[:, None, None], 0.0)
        return out
