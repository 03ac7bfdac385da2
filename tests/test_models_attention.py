"""Multi-head attention: head sizes, GATv2 formula, padding, all-padded rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from salt.models import ModelConfigError, MultiheadAttention, build_tagger, resolve_heads
from salt.models.attention import masked_softmax
from tests.conftest import ATTENTIONS, model_cfg


def test_heads_and_head_dim_are_derived_from_each_other() -> None:
    assert resolve_heads(256, 8, None, "x") == (8, 32)
    assert resolve_heads(256, None, 64, "x") == (4, 64)
    assert resolve_heads(256, 4, 64, "x") == (4, 64)


@pytest.mark.parametrize(
    ("num_heads", "head_dim", "pattern"),
    [
        (8, 64, r"model\.attention: num_heads=8 x head_dim=64 = 512 does not equal .* 256"),
        (6, None, r"model\.attention: .* 256 is not divisible by num_heads=6"),
        (None, 48, r"model\.attention: .* 256 is not divisible by head_dim=48"),
        (None, None, r"model\.attention: set num_heads or head_dim"),
        (0, None, r"model\.attention\.num_heads must be a positive int"),
    ],
)
def test_inconsistent_heads_error(num_heads, head_dim, pattern) -> None:
    with pytest.raises(ModelConfigError, match=pattern):
        resolve_heads(256, num_heads, head_dim, "model.attention")


def test_inconsistent_heads_error_fires_from_the_config() -> None:
    cfg = model_cfg("GN2")
    cfg.attention.head_dim = 64  # with num_heads: 8 and embed_dim: 256
    with pytest.raises(ModelConfigError, match=r"model\.attention: num_heads=8 x head_dim=64"):
        build_tagger(cfg)
    cfg.attention.num_heads = None  # head_dim alone: 4 heads of 64
    assert build_tagger(cfg).encoder.layers[0].attn.num_heads == 4


def gatv2_reference(attn: MultiheadAttention, x: torch.Tensor, pad: torch.Tensor) -> tuple:
    """GATv2 evaluated from its formula with loops: scores e[b, h, i, j] and the output."""
    b_size, t, _ = x.shape
    h_n, d = attn.num_heads, attn.head_dim
    a = attn.gatv2.weight
    q, k, v = attn.linear_q(x), attn.linear_k(x), attn.linear_v(x)
    scores = torch.zeros(b_size, h_n, t, t)
    messages = torch.zeros(b_size, t, h_n * d)
    for b in range(b_size):
        for h in range(h_n):
            sl = slice(h * d, (h + 1) * d)
            for i in range(t):
                for j in range(t):
                    s = q[b, i, sl] + k[b, j, sl]
                    scores[b, h, i, j] = torch.dot(a[h], F.leaky_relu(s, 0.2))
                real = [j for j in range(t) if not pad[b, j]]
                if not real:
                    continue
                alpha = torch.softmax(scores[b, h, i, real], dim=0)
                messages[b, i, sl] = sum(alpha[n] * v[b, j, sl] for n, j in enumerate(real))
    out = attn.linear_out(messages)
    out[pad.all(dim=1)] = 0.0  # no real key: no message
    return scores, out


@torch.no_grad()
def test_gatv2_scores_equal_the_formula() -> None:
    torch.manual_seed(0)
    attn = MultiheadAttention(6, 2, score="gatv2", negative_slope=0.2).eval()
    x = torch.randn(3, 4, 6)
    pad = torch.tensor([[False, True, False, False], [True] * 4, [False] * 4])
    scores_ref, out_ref = gatv2_reference(attn, x, pad)
    qh = attn._heads(attn.linear_q(x))
    kh = attn._heads(attn.linear_k(x))
    torch.testing.assert_close(attn.gatv2(qh, kh), scores_ref)
    torch.testing.assert_close(attn(x, kv_mask=pad), out_ref)


@pytest.mark.parametrize("score", ATTENTIONS)
@torch.no_grad()
def test_padded_keys_never_influence_queries(score: str) -> None:
    torch.manual_seed(1)
    attn = MultiheadAttention(8, 2, score=score).eval()
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False, False, True, False, True], [False, True, True, True, True]])
    out = attn(x, kv_mask=pad)
    garbage = x.clone()
    garbage[pad] = 100 * torch.randn(int(pad.sum()), 8)
    torch.testing.assert_close(attn(garbage, kv_mask=pad)[~pad], out[~pad])


@torch.no_grad()
def test_scaled_dot_product_equals_the_formula() -> None:
    torch.manual_seed(2)
    attn = MultiheadAttention(8, 2).eval()
    x = torch.randn(2, 4, 8)
    pad = torch.tensor([[False, True, False, False], [False, False, False, True]])
    q, k, v = (attn._heads(lin(x)) for lin in (attn.linear_q, attn.linear_k, attn.linear_v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    expected = attn.linear_out((scores.softmax(-1) @ v).transpose(1, 2).flatten(-2))
    torch.testing.assert_close(attn(x, kv_mask=pad), expected)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("score", ATTENTIONS)
def test_rows_without_real_keys_are_finite_zero_with_finite_gradients(score: str) -> None:
    torch.manual_seed(3)
    attn = MultiheadAttention(8, 2, score=score, dropout=0.1).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    pad = torch.tensor([[True, True, True], [False, True, False]])
    with torch.autograd.detect_anomaly(check_nan=True):  # no NaN anywhere in the backward
        out = attn(x, kv_mask=pad)
        assert torch.isfinite(out).all()
        assert torch.count_nonzero(out[0]) == 0
        out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


@pytest.mark.parametrize("score", ATTENTIONS)
@torch.no_grad()
def test_cross_attention_from_a_token_to_tracks(score: str) -> None:
    torch.manual_seed(4)
    attn = MultiheadAttention(8, 4, score=score, kv_dim=5).eval()
    token = torch.randn(3, 1, 8)
    tracks = torch.randn(3, 6, 5)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 2:] = True
    pad[2] = True
    out = attn(token, tracks, kv_mask=pad)
    assert out.shape == (3, 1, 8)
    # jet 1 sees only its first two tracks
    torch.testing.assert_close(out[1:2], attn(token[1:2], tracks[1:2, :2]))
    assert torch.count_nonzero(out[2]) == 0


def test_masked_softmax_zero_for_padded_and_empty_rows() -> None:
    scores = torch.randn(3, 4)
    pad = torch.tensor([[False, True, False, True], [True] * 4, [False] * 4])
    w = masked_softmax(scores, pad)
    torch.testing.assert_close(w.sum(-1), torch.tensor([1.0, 0.0, 1.0]))
    assert (w[pad] == 0).all()
