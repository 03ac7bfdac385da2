"""Dense (fully connected) networks, with inputs that may be a concatenation of parts.

A layer applied to a concatenation `[a; b; c]` equals `W_a a + W_b b + W_c c + bias`.
`ConcatLinear` stores the single weight of that layer but computes it part by part, so a
per-jet context appended to every track is projected once per jet and broadcast, and a
track-pair input `[x_i; x_j; c]` is two per-track projections added pairwise: the same
math as concatenating, without building the (much larger) concatenated tensor.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salt.models.dropout import Dropout
from salt.models.packing import Packing
from salt.utils import typed_config as check

NORMS = ("LayerNorm",)


@dataclass
class DenseConfig:
    """A dense network's settings (`init_net`, each task head, a pooling block's feed-forward)."""

    hidden_layers: list[int] = field(default_factory=list)
    activation: str = "SiLU"  # a torch.nn activation's class name
    norm: str | None = "LayerNorm"  # LayerNorm or null
    dropout: float = 0.0

    def check(self, where: str) -> None:
        for i, n in enumerate(self.hidden_layers):
            check.positive(n, f"{where}.hidden_layers[{i}]")
        check.activation(self.activation, f"{where}.activation")
        if self.norm is not None:
            check.one_of(self.norm, f"{where}.norm", [*NORMS, None])
        check.fraction(self.dropout, f"{where}.dropout")

    def layers(self) -> dict:
        """The keyword arguments of `Dense` these settings give."""
        return {
            "hidden_layers": list(self.hidden_layers),
            "activation": self.activation,
            "norm": self.norm,
            "dropout": self.dropout,
        }


def activation_layer(name: str) -> nn.Module:
    """Instantiate a torch.nn activation by class name (e.g. "SiLU", "ReLU")."""
    return getattr(nn, name)()


class ConcatLinear(nn.Module):
    """Linear layer on the concatenation of several inputs, computed without concatenating.

    The weight is one `nn.Linear(sum(in_sizes), out_size)`; part `i` uses the columns
    `in_sizes[:i].sum() ... in_sizes[:i+1].sum()`. Parts are broadcast against each other.
    """

    def __init__(self, in_sizes: Sequence[int], out_size: int) -> None:
        super().__init__()
        self.in_sizes = [int(n) for n in in_sizes]
        self.linear = nn.Linear(sum(self.in_sizes), out_size)
        bounds = [0]
        for n in self.in_sizes:
            bounds.append(bounds[-1] + n)
        self._bounds = bounds

    def project(self, index: int, x: Tensor, bias: bool = False) -> Tensor:
        """The contribution of input part `index`, with the layer's bias if `bias`."""
        lo, hi = self._bounds[index], self._bounds[index + 1]
        return F.linear(x, self.linear.weight[:, lo:hi], self.linear.bias if bias else None)

    def forward(self, *parts: Tensor) -> Tensor:
        if len(parts) != len(self.in_sizes):
            raise ValueError(f"ConcatLinear expects {len(self.in_sizes)} inputs, got {len(parts)}")
        if len(parts) == 1:
            return self.linear(parts[0])
        # The bias goes with the last part (the context: the smallest tensor); F.linear keeps
        # every term in the autocast dtype.
        out = self.project(0, parts[0])
        for i in range(1, len(parts) - 1):
            out = out + self.project(i, parts[i])
        return out + self.project(len(parts) - 1, parts[-1], bias=True)


class Dense(nn.Module):
    """Feed-forward network: `[Linear -> (LayerNorm) -> activation -> (dropout)] * n -> Linear`.

    `context_size > 0` appends a context vector (one per jet) to every input row, e.g. the
    jet variables to every track. The first layer is a `ConcatLinear` over the input parts
    (and the context); `rest` holds everything after it, so callers with structured inputs
    (track pairs) can combine first-layer projections themselves and then apply `rest`.
    """

    def __init__(
        self,
        input_size: int | Sequence[int],
        output_size: int,
        hidden_layers: Sequence[int] = (),
        activation: str = "SiLU",
        norm: str | None = "LayerNorm",
        dropout: float = 0.0,
        context_size: int = 0,
    ) -> None:
        super().__init__()
        parts = [input_size] if isinstance(input_size, int) else list(input_size)
        self.input_size = sum(parts)
        self.context_size = int(context_size)
        self.output_size = int(output_size)
        if self.context_size:
            parts.append(self.context_size)

        sizes = [*hidden_layers, output_size]
        self.first = ConcatLinear(parts, sizes[0])
        rest: list[nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes):
            if norm == "LayerNorm":
                rest.append(nn.LayerNorm(n_in))
            rest.append(activation_layer(activation))
            if dropout:
                rest.append(Dropout(dropout))
            rest.append(nn.Linear(n_in, n_out))
        self.rest = nn.Sequential(*rest)
        self._tail = self._run_rest  # `compile_tail` swaps in a compiled one

    def _run_rest(self, h: Tensor) -> Tensor:
        return self.rest(h)

    def tail(self, h: Tensor) -> Tensor:
        """Everything after the first layer (`rest`) on first-layer outputs `h`."""
        return self._tail(h)

    def compile_tail(self, backend: str = "inductor") -> None:
        """torch.compile `tail` (dynamic row count): per row, so the same on any layout.

        A method of ours is compiled, not `rest` itself: torch.compile does not trace a
        module whose code is all torch's (an `nn.Sequential`).
        """
        self._tail = torch.compile(self._run_rest, dynamic=True, backend=backend)

    def forward(
        self, x: Tensor, context: Tensor | None = None, packing: Packing | None = None
    ) -> Tensor:
        """Apply to `x[..., input_size]`; `context[B, context_size]` is appended to every row.

        Rows of `x[B, ..., F]` take the context of their jet b; with a `packing`, `x[N, F]`
        holds packed tracks (see `salt.models.packing`) and each takes its jet's context.
        """
        if not self.context_size:
            return self.tail(self.first(x))
        if context is None:
            raise ValueError("this Dense network was built with a context; pass one")
        if packing is not None:
            if len(self.first.in_sizes) != 2:
                raise ValueError("a packed context needs a Dense network with a single input")
            # project the context once per jet, then give every track its jet's projection
            per_jet = self.first.project(1, context, bias=True)
            return self.tail(self.first.project(0, x) + packing.per_track(per_jet))
        # context [B, C] -> [B, 1, ..., C] to broadcast against x [B, ..., F]
        context = context.reshape(context.shape[0], *([1] * (x.dim() - 2)), -1)
        return self.tail(self.first(x, context))


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
