"""Dense networks: the part-wise first layer equals the concatenated input."""

from __future__ import annotations

import torch

from salt.models import Dense, count_parameters
from salt.models.dense import ConcatLinear


@torch.no_grad()
def test_concat_linear_equals_linear_on_the_concatenation() -> None:
    torch.manual_seed(0)
    layer = ConcatLinear([3, 2, 4], 5)
    a, b, c = torch.randn(6, 3), torch.randn(6, 2), torch.randn(6, 4)
    expected = layer.linear(torch.cat([a, b, c], dim=-1))
    torch.testing.assert_close(layer(a, b, c), expected)


@torch.no_grad()
def test_context_is_appended_to_every_row() -> None:
    torch.manual_seed(1)
    net = Dense(4, 3, hidden_layers=[8, 8], activation="ReLU", context_size=2).eval()
    x, context = torch.randn(5, 7, 4), torch.randn(5, 2)
    concatenated = torch.cat([x, context[:, None, :].expand(5, 7, 2)], dim=-1)
    expected = net.rest(net.first.linear(concatenated))
    torch.testing.assert_close(net(x, context), expected)
    assert net.input_size == 4 and net.context_size == 2 and net.output_size == 3


def test_layers_norm_and_parameter_count() -> None:
    net = Dense(10, 2, hidden_layers=[16], activation="SiLU", norm="LayerNorm", dropout=0.1)
    kinds = [type(m).__name__ for m in net.rest]
    assert kinds == ["LayerNorm", "SiLU", "Dropout", "Linear"]
    assert count_parameters(net) == (10 * 16 + 16) + 2 * 16 + (16 * 2 + 2)
    plain = Dense(10, 2)
    assert len(plain.rest) == 0 and plain.first.linear.out_features == 2
