"""Agglomerative token clustering (ATC) as a merge rule: the r closest pairs of clusters join, one pair at a time.

Pure tensor code with no knowledge of transformers; written from the description in "Agglomerative Token
Clustering" (Haurum, Escalera, Taylor and Moeslund, ECCV 2024). Per layer, on the cosine similarities of the
tokens' metric (the head-averaged keys, as ToMe's):

1. Every unprotected token starts as a cluster of its own.
2. ``r`` times, the two most similar clusters join. With average linkage the similarity of two clusters is the mean
   of the similarities of their members, updated after each join by Lance and Williams' rule
   ``s(a + b, k) = (n_a * s(a, k) + n_b * s(b, k)) / (n_a + n_b)`` (``n``: members counted in this layer). Ties go
   to the pair whose lower index is smallest, then to the smaller other index.
3. Each cluster becomes one token at the slot of its lowest-index member (``merge_weighted`` forms its value).

Unlike ToMe's bipartite split, any token may join any other and a cluster may grow past two members in one layer,
so a large uniform region can collapse into one token while distinct tokens stay apart. Exactly ``r`` tokens go,
so token counts, batching and the FLOPs accounting are ToMe's. The step is returned as a
:class:`~hf_tome.core.ops.pruning.PruneMerge` with nothing pruned.

Eagerly, each join re-reads only the rows whose best partner changed (a few of N); while a graph is captured for
export, every join takes the maximum over the whole similarity matrix instead (no shape depends on the data).
Both paths choose the same pairs.
"""

from __future__ import annotations

import torch

from hf_tome.core.ops.exportable import capturing_graph, unit_rows
from hf_tome.core.ops.pruning import PruneMerge


def agglomerative_matching(metric: torch.Tensor, r: int, protected: int = 1) -> PruneMerge:
    """Merge ``r`` tokens of ``metric`` [B, N, D] by average-linkage agglomerative clustering (module docstring).

    ``r`` must already be clamped to ``(N - protected) // 2`` (ToMe's bound, so every rule merges the same counts).
    The protected prefix ``[0, protected)`` never joins a cluster. Runs without gradients: only applying the result
    (``merge_weighted``) is differentiable.
    """
    num_tokens = metric.shape[1]
    if r < 0 or r > (num_tokens - protected) // 2:
        raise ValueError(f"r={r} is out of range: expected 0 <= r <= (N - protected) // 2 = "
                         f"{(num_tokens - protected) // 2} for N={num_tokens}, protected={protected}")
    with torch.no_grad():
        # float32: in bfloat16 near-ties flip and the order of the joins becomes noisy.
        unit = unit_rows(metric)
        similarity = unit @ unit.transpose(1, 2)
        # A token never joins itself, and the protected prefix joins nothing.
        if capturing_graph():
            index = torch.arange(num_tokens, device=metric.device)
            closed = (index[:, None] == index) | (index[:, None] < protected) | (index < protected)
            similarity.masked_fill_(closed, -torch.inf)
            join = _join_by_full_maximum
        else:  # the same values, without a pass over the whole matrix
            similarity.diagonal(dim1=1, dim2=2).fill_(-torch.inf)
            similarity[:, :protected] = -torch.inf
            similarity[:, :, :protected] = -torch.inf
            join = _join_by_row_maxima
        parent = join(similarity, r)
        return _clusters_to_step(parent, r, protected)


class _Clusters:
    """Member counts [B, N] and the parent [B, N] of every token (itself while it leads a cluster)."""

    def __init__(self, similarity: torch.Tensor) -> None:
        batch, num_tokens, _ = similarity.shape
        self.members = torch.ones(batch, num_tokens, device=similarity.device)
        self.parent = torch.arange(num_tokens, device=similarity.device).expand(batch, -1).clone()

    def join(self, similarity: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Join cluster ``second`` into ``first`` (indices [B, 1], first < second); write and return the new row.

        The new row [B, N] holds the joined cluster's average-linkage similarity to every open cluster, -inf to
        itself and to protected tokens, and is written into ``similarity``'s row and column ``first``. Row and column
        ``second``, and the columns of tokens joined away earlier, are the caller's (overwritten or masked).
        """
        num_tokens = similarity.shape[1]
        rows = [similarity.gather(1, i[..., None].expand(-1, -1, num_tokens))[:, 0] for i in (first, second)]
        count_first, count_second = self.members.gather(1, first), self.members.gather(1, second)
        # -inf (a protected or closed token) stays -inf: both counts are positive. So do the new row's own columns:
        # the diagonal is -inf from the start and every written row keeps it, so s(first, first) and
        # s(second, second) carry -inf into columns first and second.
        joined = (count_first * rows[0] + count_second * rows[1]) / (count_first + count_second)
        # Rows and columns by scatter rather than advanced indexing: both export as one ScatterElements node.
        similarity.scatter_(1, first[..., None].expand(-1, -1, num_tokens), joined[:, None])
        similarity.scatter_(2, first[:, None].expand(-1, num_tokens, -1), joined[..., None])
        self.members.scatter_add_(1, first, count_second)
        self.parent.scatter_(1, second, first)
        return joined


def _pair(row: torch.Tensor, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair (lower index, higher index) [B, 1] each of a maximum's row and column [B]."""
    return torch.minimum(row, column)[:, None], torch.maximum(row, column)[:, None]


def _join_by_full_maximum(similarity: torch.Tensor, r: int) -> torch.Tensor:
    """``r`` joins, each at the first maximum of the whole matrix in row-major order; the parent of every token."""
    num_tokens = similarity.shape[1]
    clusters = _Clusters(similarity)
    for _ in range(r):
        flat_best = similarity.flatten(1).argmax(dim=1)
        first, second = _pair(flat_best // num_tokens, flat_best % num_tokens)
        clusters.join(similarity, first, second)
        closed = torch.full_like(similarity[:, 0], -torch.inf)
        similarity.scatter_(1, second[..., None].expand(-1, -1, num_tokens), closed[:, None])
        similarity.scatter_(2, second[:, None].expand(-1, num_tokens, -1), closed[..., None])
    return clusters.parent


def _join_by_row_maxima(similarity: torch.Tensor, r: int) -> torch.Tensor:
    """The joins of :func:`_join_by_full_maximum`, keeping every row's maximum so a join re-reads only a few rows.

    A row's maximum (value and first column) changes only when its best partner joined (row re-read) or when the new
    cluster beats it (compared with the joined row). The first maximum over rows then over columns is the row-major
    first maximum, so the pairs are the full search's, ties included. A joined-away token is marked closed instead of
    overwriting its row and column: its row is never read again, and reads of its column are masked.
    """
    batch, num_tokens, _ = similarity.shape
    clusters = _Clusters(similarity)
    columns = torch.arange(num_tokens, device=similarity.device)
    closed = torch.zeros(batch, num_tokens, dtype=torch.bool, device=similarity.device)
    best_value, best_column = similarity.max(dim=2)
    for _ in range(r):
        row = best_value.argmax(dim=1, keepdim=True)
        first, second = _pair(row[:, 0], best_column.gather(1, row)[:, 0])
        closed.scatter_(1, second, True)
        # The joined row is exact in every open column; in closed ones it may hold stale values, which the masks
        # below keep out of every maximum.
        joined = clusters.join(similarity, first, second)
        stale = (best_column == first) | (best_column == second)
        better = (joined > best_value) | ((joined == best_value) & (first < best_column))
        best_value = torch.where(better, joined, best_value)
        best_column = torch.where(better, first.expand_as(best_column), best_column)
        stale = (stale & ~better) | (columns == first)
        rows = stale.nonzero()  # [K, 2] (batch, row): the rows to re-read, without the closed columns
        values = similarity[rows[:, 0], rows[:, 1]].masked_fill(closed[rows[:, 0]], -torch.inf)
        best = values.max(dim=1)
        best_value[rows[:, 0], rows[:, 1]] = best.values
        best_column[rows[:, 0], rows[:, 1]] = best.indices
        best_value.masked_fill_(closed, -torch.inf)
    return clusters.parent


def _clusters_to_step(parent: torch.Tensor, r: int, protected: int) -> PruneMerge:
    """The :class:`PruneMerge` of a clustering given every token's parent (a lower index, or itself if it leads)."""
    batch, num_tokens = parent.shape
    device = parent.device
    # Pointer jumping: after k rounds every token points 2**k links up its chain; chains are at most r links long.
    for _ in range(max(r, 1).bit_length()):
        parent = parent.gather(1, parent)
    index = torch.arange(num_tokens, device=device).expand(batch, -1)
    leads = parent == index
    # Leads first in ascending order (the protected prefix among them), then the joined tokens in ascending order.
    order = torch.where(leads, index, index + num_tokens).sort(dim=1).values % num_tokens
    kept, merged = order[:, : num_tokens - r], order[:, num_tokens - r:]
    slots = torch.arange(num_tokens - r, device=device).expand(batch, -1)
    slot_of = torch.zeros(batch, num_tokens, dtype=torch.long, device=device).scatter(1, kept, slots)
    merged_into = slot_of.gather(1, parent.gather(1, merged))
    nothing = torch.zeros(batch, 0, dtype=torch.long, device=device)
    return PruneMerge(protected, kept, merged, merged_into, nothing, nothing)
