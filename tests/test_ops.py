"""Pure tensor ops: bipartite matching, size-weighted merging, positions, sources."""

from __future__ import annotations

import pytest
import torch

from hf_tome.core.ops import bipartite_soft_matching, merge_source, merge_weighted, unmerge
from hf_tome.core.schedule import clamp_r, tokens_per_layer


@pytest.mark.parametrize("protected", [0, 1, 2, 5])
@pytest.mark.parametrize("num_tokens", [9, 12, 17])
def test_merge_is_a_size_weighted_average_of_groups(protected, num_tokens):
    torch.manual_seed(protected * 100 + num_tokens)
    x, size = torch.randn(3, num_tokens, 6), torch.randint(1, 4, (3, num_tokens, 1)).float()
    r = clamp_r(num_tokens, num_tokens, protected)
    matching = bipartite_soft_matching(x, r, protected)
    merged, merged_size = merge_weighted(matching, x, size)
    source = merge_source(matching, torch.eye(num_tokens).expand(3, -1, -1))
    assert merged.shape == (3, num_tokens - r, 6)
    torch.testing.assert_close(merged[:, :protected], x[:, :protected])
    assert torch.equal(merged_size[:, :protected], size[:, :protected])
    torch.testing.assert_close(merged_size, source @ size)
    torch.testing.assert_close(merged, (source @ (x * size)) / (source @ size))
    # new_positions is the argmax of the source matrix, and unmerge copies each group's value back.
    positions = matching.new_positions(num_tokens)
    assert torch.equal(positions, source.argmax(1))
    torch.testing.assert_close(unmerge(merged, positions), source.transpose(1, 2) @ merged)


def test_most_similar_pair_merges_first():
    # Tokens 3 (set B) and 4 (set A) are identical: with r=1 they must be the pair merged.
    x = torch.randn(1, 8, 4)
    x[0, 4] = x[0, 3]
    matching = bipartite_soft_matching(x, 1, protected=1)
    assert matching.merged_a.flatten().tolist() == [2]  # A index 2 = position 4
    assert matching.destination_b.flatten().tolist() == [1]  # B index 1 = position 3
    merged, size = merge_weighted(matching, x, torch.ones(1, 8, 1))
    assert sorted(size.flatten().tolist()) == [1.0] * 6 + [2.0]


def test_out_of_range_r_raises():
    with pytest.raises(ValueError, match=r"r=5 is out of range: expected 0 <= r <= \(N - protected\) // 2 = 4"):
        bipartite_soft_matching(torch.randn(1, 10, 4), 5, protected=1)


def test_matching_ignores_the_rest_of_the_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 20, 8)
    together = bipartite_soft_matching(x, 6).merged_a
    alone = torch.cat([bipartite_soft_matching(x[i : i + 1], 6).merged_a for i in range(4)])
    assert torch.equal(together, alone)


def test_merge_is_differentiable_matching_is_not():
    x = torch.randn(2, 10, 4, requires_grad=True)
    matching = bipartite_soft_matching(x, 3)
    assert not matching.merged_a.requires_grad
    merged, merged_size = merge_weighted(matching, x, torch.ones(2, 10, 1))
    (merged * merged_size).sum().backward()  # group sums: every input token contributes once
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_tokens_per_layer_clamps_to_half_of_unprotected():
    assert tokens_per_layer(197, [100, 100], 1) == [197, 99, 50]
    assert tokens_per_layer(10, [0, 3, 3], 2) == [10, 10, 7, 5]
