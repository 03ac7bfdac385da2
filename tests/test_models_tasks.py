"""Task heads: losses against direct computations, padding and empty batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from salt.models import ClassificationTask, RegressionTask, VertexingTask
from salt.models.tasks import pair_weights


def direct_vertexing_loss(logits, vertex, pad, origin=None, reduction="pairs") -> torch.Tensor:
    """BCE over ordered pairs (i != j) of real tracks, one pair at a time. With origins, the
    old tool's integer weights: w = +1 (from B, BC, C), -1 (fake), 0 (else) per track and
    1 + (w_i & w_j) per pair (two's complement: -1 & 1 = 1). Divided by the number of
    same-vertex pairs (positive_pairs) or by the weights' sum (pairs)."""
    total, weights, positives = 0.0, 0.0, 0
    b_size, t = pad.shape
    for b in range(b_size):
        for i in range(t):
            for j in range(t):
                if i == j or pad[b, i] or pad[b, j]:
                    continue
                same = bool(vertex[b, i] == vertex[b, j] and vertex[b, i] >= 0)
                w = 1
                if origin is not None:
                    wi, wj = (
                        int(o in (3, 4, 5)) - int(o == 1)
                        for o in (int(origin[b, i]), int(origin[b, j]))
                    )
                    w = 1 + (wi & wj)
                bce = F.binary_cross_entropy_with_logits(logits[b, i, j], torch.tensor(float(same)))
                total, weights, positives = total + w * bce, weights + w, positives + same
    return total / (positives if reduction == "positive_pairs" else weights)


def test_vertexing_loss_equals_the_per_pair_computation() -> None:
    torch.manual_seed(0)
    pad = torch.tensor([[False, False, True, False, False], [False, True, False, False, False]])
    vertex = torch.tensor([[0, 0, -1, 1, 1], [-1, -1, 2, 2, -1]])  # -1: no vertex, no match
    origin = torch.tensor([[3, 1, -1, 1, 4], [2, -1, 5, 0, 1]])
    logits = torch.randn(2, 5, 5)
    for reduction in ("positive_pairs", "pairs"):
        task = VertexingTask(
            "vtx", "ftagTruthVertexIndex", input_size=4, context_size=3, reduction=reduction
        )
        loss = task.loss(logits, vertex, pad)
        torch.testing.assert_close(
            loss, direct_vertexing_loss(logits, vertex, pad, None, reduction)
        )
        task.origin_label = "ftagTruthOriginLabel"
        target = task.target(
            {"tracks": {"ftagTruthVertexIndex": vertex, "ftagTruthOriginLabel": origin}}
        )
        loss = task.loss(logits, target, pad)
        expected = direct_vertexing_loss(logits, vertex, pad, origin, reduction)
        torch.testing.assert_close(loss, expected)


def test_vertexing_pair_weights_follow_the_track_origins() -> None:
    # fromB, fake, primary: HF-HF 2, HF-fake 2, fake-fake 0, anything with primary 1
    weights = pair_weights(torch.tensor([[3, 1, 2, 5, 1]]))[0]
    assert weights[0, 3] == 2 and weights[0, 1] == 2 and weights[1, 0] == 2
    assert weights[1, 4] == 0 and weights[2, 0] == 1 and weights[2, 1] == 1


@torch.no_grad()
def test_vertexing_pair_logits_equal_the_concatenated_pair_input() -> None:
    torch.manual_seed(1)
    task = VertexingTask(
        "vtx", "ftagTruthVertexIndex", input_size=4, context_size=3, hidden_layers=[8, 4]
    )
    tracks, pooled = torch.randn(2, 5, 4), torch.randn(2, 3)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    out = task(pooled, tracks, pad)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                pair = torch.cat([tracks[b, i], tracks[b, j], pooled[b]])
                expected = task.net.rest(task.net.first.linear(pair)).squeeze()
                if pad[b, i] or pad[b, j]:
                    expected = torch.tensor(0.0)
                torch.testing.assert_close(out[b, i, j], expected)


def test_track_classification_ignores_padded_tracks() -> None:
    torch.manual_seed(2)
    weights = [1.0, 3.0, 0.5]
    task = ClassificationTask(
        "origin", "tracks", "ftagTruthOriginLabel", ["a", "b", "c"], 4, class_weights=weights
    )
    logits = torch.randn(2, 3, 3)
    pad = torch.tensor([[False, True, False], [False, False, True]])
    labels = torch.tensor([[2, 1, 0], [1, -1, 0]])  # -1 on a real track: unknown, ignored
    loss = task.loss(logits, labels, pad)
    real = (~pad) & (labels >= 0)
    expected = F.cross_entropy(logits[real], labels[real], weight=torch.tensor(weights))
    torch.testing.assert_close(loss, expected)


def test_track_losses_are_zero_without_real_tracks() -> None:
    pad = torch.ones(2, 3, dtype=torch.bool)
    labels = torch.full((2, 3), -1)
    origin = ClassificationTask("o", "tracks", "ftagTruthOriginLabel", ["a", "b"], 4)
    vertexing = VertexingTask("v", "ftagTruthVertexIndex", input_size=4)
    logits = torch.randn(2, 3, 2, requires_grad=True)
    pair_logits = torch.randn(2, 3, 3, requires_grad=True)
    losses = [origin.loss(logits, labels, pad), vertexing.loss(pair_logits, labels, pad)]
    assert [float(x.detach()) for x in losses] == [0.0, 0.0]
    sum(losses).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(pair_logits.grad).all()


def test_regression_losses_skip_missing_targets() -> None:
    pred = torch.tensor([[1.0], [2.0], [3.0]], requires_grad=True)  # [jets, targets]
    target = torch.tensor([[1.5], [float("nan")], [0.0]])
    pad = torch.zeros(3, 0, dtype=torch.bool)
    mse = RegressionTask("r", "pt", input_size=2, loss="mse")
    torch.testing.assert_close(mse.loss(pred, target, pad), torch.tensor((0.25 + 9.0) / 2))
    huber = RegressionTask("r", "pt", input_size=2, loss="huber", huber_delta=1.0)
    torch.testing.assert_close(huber.loss(pred, target, pad), torch.tensor((0.125 + 2.5) / 2))
    huber.loss(pred, target, pad).backward()
    assert pred.grad[1, 0] == 0
