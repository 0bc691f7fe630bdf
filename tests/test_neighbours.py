"""top_cosine: decoder neighbours and cross-SAE matches, on directions whose cosines are known."""

from __future__ import annotations

import math

import torch

from lm_saes.analysis.neighbours import top_cosine


def test_neighbours_are_the_nearest_other_directions_in_order() -> None:
    angle = math.radians(30)
    W = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)], [0.0, 2.0], [-3.0, -0.3]])
    cos, idx = top_cosine(W, W, k=2, exclude_self=True)
    assert idx.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    assert torch.allclose(cos[0], torch.tensor([math.cos(angle), 0.0]), atol=1e-6)
    unit3 = torch.tensor([-3.0, -0.3]) / math.hypot(3.0, 0.3)  # scale does not matter
    assert torch.allclose(cos[3], torch.stack([unit3[1], unit3 @ W[1]]), atol=1e-6)


def test_chunking_does_not_change_the_answer() -> None:
    torch.manual_seed(0)
    A, B = torch.randn(100, 16), torch.randn(300, 16)
    whole = top_cosine(A, B, k=5, max_elements=10**9)
    for max_elements in (1, 299, 1000):  # one row of A per chunk, ..., several rows
        chunked = top_cosine(A, B, k=5, max_elements=max_elements)
        assert torch.equal(chunked[1], whole[1]) and torch.allclose(chunked[0], whole[0])
    assert torch.equal(top_cosine(B, B, k=1, exclude_self=True, max_elements=7)[1],
                       top_cosine(B, B, k=1, exclude_self=True)[1])
