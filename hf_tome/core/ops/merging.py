"""Applying a matching: size-weighted averages, source tracking and unmerging. No transformers code here."""

from __future__ import annotations

import torch

from hf_tome.core.ops.matching import Matching
from hf_tome.core.ops.pruning import PruneMerge


def merge_weighted(matching: Matching | PruneMerge, x: torch.Tensor,
                   size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` [B, N, C] as a size-weighted average; return it with the merged sizes [B, M, 1].

    ``matching`` is a bipartite :class:`Matching` or a prune-then-merge :class:`PruneMerge` (pruned tokens
    are dropped); both reduce with ``merge(x, reduce="sum")``.

    Each group's value is ``sum(x * size) / sum(size)`` and its new size is ``sum(size)``. Sizes are float32
    whatever the dtype of ``x`` (bfloat16 holds integers exactly only up to 256, float16 up to 2048); the
    weighted sum is taken in float32 too and the average is cast back to the dtype of ``x`` once.
    """
    size = size.float()
    merged_sum = matching.merge(x.float() * size, reduce="sum")
    merged_size = matching.merge(size, reduce="sum")
    return (merged_sum / merged_size).to(x.dtype), merged_size


def merge_source(matching: Matching, source: torch.Tensor) -> torch.Tensor:
    """Merge a 0/1 source matrix [B, N, N_orig] (which original patches each token holds) with max."""
    return matching.merge(source, reduce="amax")


def unmerge(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Spread merged tokens back over the original grid: every original position takes its token's value.

    ``positions`` [B, N_orig] holds, for each original position, the index of the token that now holds it.
    """
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def initial_positions(batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """Identity map: before any merge, original position i is held by token i."""
    return torch.arange(num_tokens, device=device).expand(batch, -1)
