"""Vertex groups from same-vertex pair probabilities: connected components, numbered in the
order of their first track, the same with a fixed number of rounds (the ONNX graph's)."""

from __future__ import annotations

import torch

from salt.models.vertices import ONNX_ROUNDS, closure_rounds, vertex_groups


def reference_groups(p: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Depth-first search over the symmetrised graph, one jet at a time."""
    result = []
    for probs, padded in zip(p, mask, strict=True):
        n = len(padded)
        joined = 0.5 * (probs + probs.T) > 0.5
        groups = [-1] * n
        number = 0
        for start in range(n):
            if padded[start] or groups[start] >= 0:
                continue
            stack = [start]
            groups[start] = number
            while stack:
                i = stack.pop()
                for j in range(n):
                    if joined[i, j] and not padded[j] and groups[j] < 0:
                        groups[j] = number
                        stack.append(j)
            number += 1
        result.append(groups)
    return result


def test_vertex_groups_are_connected_components() -> None:
    # tracks 0-1 and 1-3 joined (0, 1, 3 one vertex, by transitivity), 2 alone, 4 padded
    p = torch.zeros(1, 5, 5)
    for i, j in ((0, 1), (1, 3), (2, 4)):
        p[0, i, j] = p[0, j, i] = 0.9
    p[0, 2, 3] = 0.8  # one direction only: symmetrised (0.8 + 0) / 2 < 0.5
    mask = torch.tensor([[False, False, False, False, True]])
    assert vertex_groups(p, mask).tolist() == [[0, 0, 1, 0, -1]]


def test_a_long_chain_is_one_vertex() -> None:
    """A chain through every slot in scrambled order: the longest path the rounds must join."""
    n = 40
    # from slot 0 (the label every track must reach) through the others in scrambled order
    rest = torch.randperm(n - 1, generator=torch.Generator().manual_seed(3)) + 1
    order = torch.cat([torch.zeros(1, dtype=torch.long), rest])
    line = torch.zeros(1, n, n)
    line[0, order[:-1], order[1:]] = line[0, order[1:], order[:-1]] = 1.0
    mask = torch.zeros(1, n, dtype=torch.bool)
    assert vertex_groups(line, mask).tolist() == [[0] * n]
    # 6 squarings join paths of 64 >= 39 steps; 5 would not (32): the count is tight
    assert closure_rounds(n) == 6
    assert all(2 ** closure_rounds(k) >= k - 1 > 2 ** (closure_rounds(k) - 1) for k in (3, 40, 64))


def test_random_graphs_match_a_depth_first_search() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        slots = int(torch.randint(1, 30, (1,), generator=gen))
        density = float(torch.rand(1, generator=gen)) * 0.3
        p = torch.rand(6, slots, slots, generator=gen) * (0.5 + density) + 0.0
        mask = torch.rand(6, slots, generator=gen) < 0.3
        expected = reference_groups(p, mask)
        assert vertex_groups(p, mask).tolist() == expected
        assert vertex_groups(p, mask, rounds=ONNX_ROUNDS).tolist() == expected
