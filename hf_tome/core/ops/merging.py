"""Applying a matching: size-weighted averages, source tracking and unmerging. No transformers code here."""

from __future__ import annotations

import torch

from hf_tome.config import MERGE_MODES
from hf_tome.core.ops.exportable import gather_rows
from hf_tome.core.ops.matching import Matching
from hf_tome.core.ops.pruning import PruneMerge

LAYER_MERGE_MODES = (*MERGE_MODES, "prune")
"""What one layer's merge step may do: a config's ``merge_mode``, or ToFu's ``"prune"`` in the first
``ToMeConfig.prune_matched_layers`` layers."""


def merge_weighted(matching: Matching | PruneMerge, x: torch.Tensor, size: torch.Tensor,
                   mode: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` [B, N, C] as a size-weighted average; return it with the merged sizes [B, M, 1].

    ``matching`` is a bipartite :class:`Matching` or a :class:`PruneMerge` (prune-then-merge, or PiToMe's step;
    pruned tokens are dropped); both reduce with ``merge(x, reduce="sum")``.

    ``mode="mean"`` (ToMe): each group's value is ``sum(x * size) / sum(size)``. ``mode="mlerp"`` (ToFu's MLERP):
    the same mean direction, rescaled to the size-weighted mean of the members' norms, since averaging vectors that
    point apart shrinks the norm the next layers expect (see :func:`mlerp_rescale`). Either way the new size is
    ``sum(size)``. ``mode="prune"`` (ToFu's pruning, for early layers): every output token keeps its own value and
    the tokens matched to it are dropped, while the new size is still ``sum(size)``. Sizes are float32 whatever
    the dtype of ``x`` (bfloat16 holds integers exactly only up to 256, float16 up to 2048); the weighted sums are
    taken in float32 too and the result is cast back to the dtype of ``x`` once.
    """
    if mode not in LAYER_MERGE_MODES:
        raise ValueError(f"merge mode {mode!r} is invalid: expected one of {LAYER_MERGE_MODES}")
    size = size.float()
    merged_size = matching.merge(size, reduce="sum")
    if mode == "prune":
        return matching.own_rows(x), merged_size
    wide = x.float()
    merged = matching.merge(wide * size, reduce="sum") / merged_size
    if mode == "mlerp":
        mean_norm = matching.merge(wide.norm(dim=-1, keepdim=True) * size, reduce="sum") / merged_size
        merged = mlerp_rescale(merged, mean_norm)
    return merged.to(x.dtype), merged_size


def mlerp_rescale(mean: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """``mean`` [B, M, C] rescaled to norm ``target_norm`` [B, M, 1]: ``mean / ||mean|| * target_norm``.

    A zero ``mean`` (members that cancel out) has no direction and stays zero; the divisor is guarded so neither the
    value nor its gradient becomes NaN.
    """
    norm = mean.norm(dim=-1, keepdim=True)
    nonzero = norm > 0
    scale = target_norm / torch.where(nonzero, norm, torch.ones_like(norm))
    return torch.where(nonzero, mean * scale, mean)


def merge_source(matching: Matching | PruneMerge, source: torch.Tensor) -> torch.Tensor:
    """Merge a 0/1 source matrix [B, N, N_orig] (which original patches each token holds) with max."""
    return matching.merge(source, reduce="amax")


def unmerge(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Spread merged tokens back over the original grid: every original position takes its token's value.

    ``positions`` [B, N_orig] holds, for each original position, the index of the token that now holds it.
    """
    return gather_rows(x, positions)


def initial_positions(batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """Identity map: before any merge, original position i is held by token i."""
    return torch.arange(num_tokens, device=device).expand(batch, -1)
