"""ATC's merge rule (``merge_rule="agglomerative"``) on constructed tensors.

Its clusters are checked against SciPy's average-linkage clustering, its eager path against the one that runs while a
graph is captured (ties included), and a tight group of tokens against ToMe's bipartite split, which cannot join it.
The rule on models (token counts, r=0, batch invariance, eager against sdpa, plans, save/load, export) is tested
with the other rules in test_merge_rules.py and test_export.py.
"""

from __future__ import annotations

import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from hf_tome.core.ops import agglomerative as agglomerative_module
from hf_tome.core.ops import agglomerative_matching, bipartite_soft_matching, merge_weighted, unmerge
from hf_tome.core.plan import LayerMerge
from hf_tome.core.reduce import reduce_tokens


def _groups(step, num_tokens: int) -> list[set[frozenset[int]]]:
    """Per batch row, the set of groups of input indices that became one output token."""
    groups = []
    for b in range(step.kept.shape[0]):
        members = {int(slot): {int(token)} for slot, token in enumerate(step.kept[b])}
        for token, slot in zip(step.merged[b].tolist(), step.merged_into[b].tolist(), strict=True):
            members[slot].add(token)
        assert sorted(t for group in members.values() for t in group) == list(range(num_tokens))
        groups.append({frozenset(group) for group in members.values()})
    return groups


@pytest.mark.parametrize("protected", [0, 1, 2])
def test_clusters_are_scipys_average_linkage_clusters(protected):
    torch.manual_seed(protected)
    metric = torch.randn(3, 23, 6, dtype=torch.float64).float()
    for r in (1, 4, (23 - protected) // 2):
        step = agglomerative_matching(metric, r, protected)
        assert step.num_kept == 23 - r and step.merged.shape[1] == r and step.pruned.shape[1] == 0
        for b, groups in enumerate(_groups(step, 23)):
            free = metric[b, protected:].double().numpy()
            labels = fcluster(linkage(free, method="average", metric="cosine"), t=23 - protected - r,
                              criterion="maxclust")
            expected = {frozenset(int(i) + protected for i in (labels == label).nonzero()[0]) for label in set(labels)}
            expected |= {frozenset({i}) for i in range(protected)}  # the protected prefix joins nothing
            assert groups == expected


def test_a_tight_group_becomes_one_token_where_bipartite_matching_keeps_pairs():
    metric = torch.zeros(1, 9, 4)
    metric[0, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # the class token
    metric[0, 1:5, 0] = 1.0  # four tokens in one direction, then four spread out
    metric[0, 1:5, 1] = torch.tensor([0.0, 0.01, 0.02, 0.03])
    metric[0, 5:9, 1:3] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    step = agglomerative_matching(metric, 3, protected=1)
    assert frozenset({1, 2, 3, 4}) in _groups(step, 9)[0]
    size = merge_weighted(step, torch.randn(1, 9, 2), torch.ones(1, 9, 1))[1]
    assert size[0, :, 0].tolist() == [1.0, 4.0, 1.0, 1.0, 1.0, 1.0]
    # ToMe's split cannot: tokens 1 and 3 are both in set B, which never merges within a layer
    assert bipartite_soft_matching(metric, 3, protected=1).merge(torch.ones(1, 9, 1)).max() < 4


def test_the_captured_path_joins_the_same_pairs_ties_included(monkeypatch):
    torch.manual_seed(0)
    cases = []
    for trial in range(40):
        num_tokens, protected = 6 + trial, trial % 3
        r = (num_tokens - protected) // 2 if trial % 4 == 0 else trial % ((num_tokens - protected) // 2 + 1)
        # odd trials: integer vectors, whose similarities tie often
        metric = torch.randint(-1, 2, (3, num_tokens, 3)).float() if trial % 2 else torch.randn(3, num_tokens, 5)
        cases.append((metric, r, protected, agglomerative_matching(metric, r, protected)))
    monkeypatch.setattr(agglomerative_module, "capturing_graph", lambda: True)
    for metric, r, protected, eager in cases:
        captured = agglomerative_matching(metric, r, protected)
        for name in ("kept", "merged", "merged_into"):
            assert torch.equal(getattr(captured, name), getattr(eager, name))


def test_ties_go_to_the_lowest_pair():
    metric = torch.ones(1, 6, 2)  # every pair ties
    step = agglomerative_matching(metric, 2, protected=1)
    # first (1, 2), then the cluster {1, 2} ties with 3 at 1.0 and (1, 3) is the lowest pair
    assert _groups(step, 6)[0] == {frozenset({0}), frozenset({1, 2, 3}), frozenset({4}), frozenset({5})}
    assert step.kept[0].tolist() == [0, 1, 4, 5] and step.merged[0].tolist() == [2, 3]


def test_r_is_checked_like_bipartite_matching():
    with pytest.raises(ValueError, match=r"r=9 is out of range: expected 0 <= r <= \(N - protected\) // 2 = 8"):
        agglomerative_matching(torch.randn(1, 17, 4), 9, protected=1)
    step = agglomerative_matching(torch.randn(2, 17, 4), 0, protected=1)
    assert torch.equal(step.kept, torch.arange(17).expand(2, -1)) and step.merged.shape == (2, 0)


def test_reduce_tokens_tracks_sizes_positions_and_sources():
    torch.manual_seed(0)
    hidden, metric = torch.randn(2, 17, 6), torch.randn(2, 17, 4)
    out, size, positions, source = reduce_tokens(hidden, metric, None, None, None, 5, 1, True,
                                                 LayerMerge("agglomerative", "mlerp"))
    assert out.shape == (2, 12, 6) and size.sum(dim=1).flatten().tolist() == [17.0, 17.0]
    assert torch.equal(source.sum(dim=-1, keepdim=True), size)
    assert (source.gather(1, positions[..., None].expand(-1, -1, 17)).diagonal(dim1=1, dim2=2) == 1).all()
    assert torch.equal(out[:, 0], hidden[:, 0])  # the class token is untouched
    assert unmerge(out, positions).shape == (2, 17, 6)
    # a second layer joins clusters of the first: sizes keep adding up
    out, size, positions, source = reduce_tokens(out, torch.randn(2, 12, 4), size, positions, source, 4, 1, True,
                                                 LayerMerge("agglomerative", "mean"))
    assert out.shape == (2, 8, 6) and size.sum(dim=1).flatten().tolist() == [17.0, 17.0]
    assert torch.equal(source.sum(dim=-1, keepdim=True), size)

