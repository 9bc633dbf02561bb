"""Unified token compression: rank tokens by class attention, prune the least attended, merge the middle ones.

Pure tensor code with no knowledge of transformers. Protected tokens (class, distillation, registers) form the
prefix ``[0, protected)`` of the sequence: they always rank first, are never pruned or merged away, absorb
nothing, and keep their positions, so heads that read ``hidden[:, 0]`` see the class token as before.

One step with ``prune_kept = P`` and ``merge_kept = M`` (``M <= P <= N``) on N tokens:
rank by class attention; ranks ``[P, N)`` are pruned; ranks ``[M, P)`` are merged (size-weighted) into their
most similar token among ranks ``[protected, M)`` by cosine similarity of the metric; ranks ``[0, M)`` stay.
The M output tokens are the protected prefix followed by the other kept tokens in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_tome.core.ops.exportable import add_rows, gather_rows, merge_rows, stable_descending_order, unit_rows


def class_attention(query_cls: torch.Tensor, keys: torch.Tensor, scale: float,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the class-token query to every key, averaged over heads: [B, N] (float32, rows sum to 1).

    Args:
        query_cls: [B, H, D] or [B, H, 1, D], the query of the class token only (one row instead of N, which
            is why a fused attention kernel can still compute the full attention).
        keys: [B, H, N, D].
        scale: the attention scaling (usually ``head_dim ** -0.5``).
        bias: optional additive float mask broadcastable to [B, H, Q, N] (e.g. ``log(size)`` of proportional
            attention), or a boolean mask where True means "may attend"; only its first query row is read.
    """
    if query_cls.dim() == 3:
        query_cls = query_cls[:, :, None]
    with torch.no_grad():
        # float32: in bfloat16 near-ties between tokens flip and the ranking becomes noisy.
        logits = (query_cls.float() @ keys.float().transpose(-1, -2)) * scale
        if bias is not None:
            first_row = bias[..., :1, :]
            if first_row.dtype == torch.bool:
                logits = logits.masked_fill(~first_row, -torch.inf)
            else:
                logits = logits + first_row.float()
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def rank_by_score(scores: torch.Tensor, protected: int) -> torch.Tensor:
    """Token indices [B, N] from most to least attended, with the protected prefix first in its own order."""
    batch, num_tokens = scores.shape
    prefix = torch.arange(protected, device=scores.device).expand(batch, -1)
    # A stable order makes the ranking of one image independent of the rest of the batch when scores tie (and,
    # unlike argsort(stable=True), exports to ONNX).
    rest = stable_descending_order(scores[:, protected:]) + protected
    return torch.cat([prefix, rest], dim=1)


@dataclass
class PruneMerge:
    """The outcome of one prune-then-merge step on a batch; apply it to any per-token tensor with :meth:`merge`.

    kept: [B, M] input indices of the output tokens (protected prefix, then ascending original index).
    merged: [B, P - M] input indices of the tokens merged into a kept one; ``merged_into`` [B, P - M] their
        output slot. pruned: [B, N - P] input indices of the dropped tokens; ``pruned_near`` [B, N - P] the
        output slot of their most similar kept token (only used to keep ``positions`` a full map for unmerging).
    """

    protected: int
    kept: torch.Tensor
    merged: torch.Tensor
    merged_into: torch.Tensor
    pruned: torch.Tensor
    pruned_near: torch.Tensor

    @property
    def num_kept(self) -> int:
        return self.kept.shape[1]

    def merge(self, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Reduce ``x`` [B, N, C] to [B, M, C]: kept tokens, plus merged ones combined with ``reduce``.

        Pruned tokens contribute nothing. A mean is ``merge(x * size) / merge(size)`` (exports to ONNX, unlike
        ``scatter_reduce(mean)``).
        """
        out = gather_rows(x, self.kept)
        if self.merged.shape[1] == 0:
            return out
        sources = gather_rows(x, self.merged)
        return merge_rows(out, self.merged_into, sources, reduce)

    def own_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, N, C] laid out as :meth:`merge`'s output [B, M, C], each kept token keeping its own row: the
        merged tokens are dropped like the pruned ones (ToFu's pruning)."""
        return gather_rows(x, self.kept)

    def new_positions(self, num_tokens: int) -> torch.Tensor:
        """For every input position, the output slot [B, num_tokens] that now holds it (pruned: the nearest)."""
        batch = self.kept.shape[0]
        slots = torch.arange(self.num_kept, device=self.kept.device).expand(batch, -1)
        positions = torch.empty(batch, num_tokens, dtype=torch.long, device=self.kept.device)
        positions.scatter_(1, self.kept, slots)
        positions.scatter_(1, self.merged, self.merged_into)
        positions.scatter_(1, self.pruned, self.pruned_near)
        return positions


def _most_similar_kept(metric: torch.Tensor, others: torch.Tensor, kept: torch.Tensor, protected: int) -> torch.Tensor:
    """Slot in ``kept`` [B, M] of the most similar unprotected kept token for each of ``others`` [B, K]."""
    if others.shape[1] == 0:
        return others
    unit = unit_rows(metric)
    scores = gather_rows(unit, others) @ gather_rows(unit, kept).transpose(1, 2)
    # Kept indices are sorted ascending, so the protected tokens occupy the first slots: they absorb nothing.
    scores[..., :protected] = -torch.inf
    return scores.argmax(dim=-1)


def prune_and_merge(class_scores: torch.Tensor, metric: torch.Tensor, prune_kept: int, merge_kept: int,
                    protected: int = 1) -> PruneMerge:
    """Decide one prune-then-merge step from class attention ``class_scores`` [B, N] and ``metric`` [B, N, D].

    Requires ``protected < merge_kept <= prune_kept <= N`` (so merged tokens always have an unprotected
    destination). Runs without gradients: only applying the result is differentiable.
    """
    num_tokens = class_scores.shape[1]
    if not protected < merge_kept <= prune_kept <= num_tokens:
        raise ValueError(f"prune_kept={prune_kept}, merge_kept={merge_kept} are out of range: expected "
                         f"protected ({protected}) < merge_kept <= prune_kept <= N ({num_tokens})")
    with torch.no_grad():
        order = rank_by_score(class_scores, protected)
        kept = order[:, :merge_kept].sort(dim=1).values
        others = order[:, merge_kept:]
        destination = _most_similar_kept(metric, others, kept, protected)
        num_merged = prune_kept - merge_kept
    return PruneMerge(protected, kept, others[:, :num_merged], destination[:, :num_merged], others[:, num_merged:],
                      destination[:, num_merged:])


def soft_prune_merge(x: torch.Tensor, size: torch.Tensor, class_scores: torch.Tensor, metric: torch.Tensor,
                     keep_weight: torch.Tensor, prune_weight: torch.Tensor, slots: int,
                     protected: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed prune-then-merge for a differentiable rate search; the sequence keeps its length N.

    ``keep_weight[j]`` = P(merge_kept > j) and ``prune_weight[j]`` = P(prune_kept > j), per class-attention
    rank j ([N], differentiable). The token of rank j keeps ``keep_weight[j]`` of its size, hands
    ``prune_weight[j] - keep_weight[j]`` of it (with its value) to its most similar token among the top
    ``slots`` unprotected ranks, and the rest vanishes. A token with size near 0 is invisible to proportional
    attention (``log(size)`` bias) and to size-weighted pooling, so one-hot weights give the hard step exactly.
    Returns ``(x, size)`` of the same shapes: ``x`` in its own dtype (the mixing runs in float32), ``size`` in
    float32.
    """
    batch, num_tokens = x.shape[:2]
    size = size.float()
    slots = max(protected + 1, min(slots, num_tokens))
    with torch.no_grad():
        order = rank_by_score(class_scores, protected)
        candidates = order[:, protected:slots]
        unit = unit_rows(metric)
        scores = unit @ gather_rows(unit, candidates).transpose(1, 2)
        # A token cannot be its own destination.
        scores.masked_fill_(candidates[:, None, :] == torch.arange(num_tokens, device=x.device)[None, :, None],
                            -torch.inf)
        destination = candidates.gather(1, scores.argmax(dim=-1))
    rank_of_token = torch.empty_like(order).scatter_(1, order, torch.arange(num_tokens, device=x.device).expand(
        batch, -1))
    keep = keep_weight.to(size.dtype)[rank_of_token][..., None]
    give = (prune_weight.to(size.dtype)[rank_of_token][..., None] - keep).clamp_min(0)
    own_mass, given_mass = size * keep, size * give
    mass = own_mass.scatter_add(1, destination[..., None], given_mass)
    wide = x.float()
    total = add_rows(wide * own_mass, destination, wide * given_mass)
    # Tokens with no mass left keep their old value (it no longer matters) instead of dividing by zero.
    present = mass > 1e-6
    x = torch.where(present, (total / mass.clamp_min(1e-6)).to(x.dtype), x)
    return x, mass.clamp_min(1e-6)
