"""The two token reducers a layer calls after its attention, and the size bookkeeping they share.

ToMe merging of ``r`` tokens (:func:`reduce_tokens`), or pruning by class attention followed by merging
(:func:`prune_merge_tokens`); :func:`reduce_layer_tokens` picks one from the layer's ``tome_kept``. A layer's
``tome_merge`` (:class:`~hf_tome.core.plan.LayerMerge`) swaps ToMe's matching for PiToMe's or ATC's rule and its
mean for MLERP. Sizes and sources are float32 whatever the model dtype. Pure tensor code: no transformers.
"""

import torch

from hf_tome.core.ops import (
    agglomerative_matching,
    bipartite_soft_matching,
    initial_positions,
    merge_source,
    merge_weighted,
    pitome_matching,
    prune_and_merge,
    soft_prune_merge,
)
from hf_tome.core.plan import LayerKept, LayerMerge, SoftKept
from hf_tome.core.schedule import clamp_r, effective_kept


def proportional_attention_mask(
    attention_mask: torch.Tensor | None, size: torch.Tensor | None, prop_attn: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive float mask [B, 1, 1, N] of ``log(size)`` per key token (works for eager and sdpa alike).

    ``size`` None means every token still has size 1, where the bias is zero and the fused path is kept. The log
    is taken in float32 from the float32 sizes; only the result is cast to ``dtype``, the attention's dtype
    (sdpa requires the mask in the query's dtype, and eager would otherwise promote its logits to float32).
    """
    if not prop_attn or size is None:
        return attention_mask
    if attention_mask is not None:
        raise ValueError("hf_tome: attention_mask cannot be combined with merged tokens; expected attention_mask=None")
    return size.float().log().to(dtype)[:, None, None, :, 0]


def _start_tracking(
    hidden: torch.Tensor, size: torch.Tensor | None, positions: torch.Tensor | None, source: torch.Tensor | None,
    trace_source: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sizes, positions (and sources, when traced) of a sequence about to be reduced for the first time.

    Sizes and sources are float32 whatever the model dtype: they count original tokens, which bfloat16 holds
    exactly only up to 256 (float16 up to 2048), float32 up to 2**24.
    """
    batch, num_tokens, _ = hidden.shape
    if size is None:
        size = torch.ones(batch, num_tokens, 1, dtype=torch.float32, device=hidden.device)
    if positions is None:
        positions = initial_positions(batch, num_tokens, hidden.device)
    if trace_source and source is None:
        source = torch.eye(num_tokens, dtype=torch.float32, device=hidden.device).expand(batch, -1, -1)
    return size, positions, source


def reduce_tokens(
    hidden: torch.Tensor,
    metric: torch.Tensor | None,
    size: torch.Tensor | None,
    positions: torch.Tensor | None,
    source: torch.Tensor | None,
    r: int,
    protected: int,
    trace_source: bool = False,
    merge: LayerMerge | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Merge ``r`` tokens of ``hidden`` (size-weighted) and carry sizes, positions and sources along.

    ``merge`` None is ToMe (bipartite soft matching, size-weighted mean); otherwise its rule picks the tokens
    (``"pitome"``: by energy, at its margin; ``"agglomerative"``: average-linkage clusters) and its mode forms the
    merged hidden states (``"mlerp"``). Every rule merges exactly ``r`` tokens (after the same clamp), so token
    counts do not depend on it.
    """
    num_tokens = hidden.shape[1]
    r = clamp_r(r, num_tokens, protected)
    if r == 0 or metric is None:
        return hidden, size, positions, source
    merge = merge or LayerMerge()
    if merge.rule == "pitome":
        matching = pitome_matching(metric, r, protected, margin=merge.margin)
    elif merge.rule == "agglomerative":
        matching = agglomerative_matching(metric, r, protected)
    else:
        matching = bipartite_soft_matching(metric, r, protected)
    size, positions, source = _start_tracking(hidden, size, positions, source, trace_source)
    hidden, size = merge_weighted(matching, hidden, size, merge.mode)
    positions = matching.new_positions(num_tokens).gather(1, positions)
    if source is not None:
        source = merge_source(matching, source)
    return hidden, size, positions, source


def needs_class_attention(tome_kept: LayerKept | None, num_tokens: int) -> bool:
    """True when a layer handed ``tome_kept`` will reduce ``num_tokens`` tokens (so it needs class attention)."""
    if tome_kept is None:
        return False
    if isinstance(tome_kept, SoftKept):
        return True
    return min(tome_kept.prune_kept, tome_kept.merge_kept) < num_tokens


def prune_merge_tokens(
    hidden: torch.Tensor,
    metric: torch.Tensor,
    class_scores: torch.Tensor,
    size: torch.Tensor | None,
    positions: torch.Tensor | None,
    source: torch.Tensor | None,
    prune_kept: int,
    merge_kept: int,
    protected: int,
    trace_source: bool = False,
    merge_match: str = "class_attention",
    merge: LayerMerge | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Prune to ``prune_kept`` tokens by class attention, then merge down to ``merge_kept`` (size-weighted).

    ``merge_match="class_attention"`` merges the tokens ranked between the two counts into their most similar
    kept token; ``"bipartite"`` merges the survivors of pruning by ToMe's bipartite soft matching, which removes
    at most half of the unprotected tokens (``hf_tome.apply`` refuses counts that need more, so the count here is
    exact and the FLOPs accounting holds). Counts above the tokens present never reach here: ``apply`` refuses them
    for layers 1 and up, and :func:`run_layers` for layer 0's input. Pruned patches are held by no token in
    ``source``; ``positions`` sends them to their most similar kept token, so unmerging still fills the grid.
    ``merge`` (see :func:`reduce_tokens`): its mode forms every merged hidden state; its rule replaces the bipartite
    step of ``merge_match="bipartite"`` (the class-attention merge has no bipartite step).
    """
    num_tokens = hidden.shape[1]
    prune_kept, merge_kept = effective_kept(num_tokens, prune_kept, merge_kept)
    bipartite = merge_match == "bipartite"
    # Bipartite matching takes only the pruning from the class-attention step: it merges the survivors itself.
    ranked_kept = prune_kept if bipartite else merge_kept
    if ranked_kept < num_tokens:
        step = prune_and_merge(class_scores, metric, prune_kept, ranked_kept, protected)
        size, positions, source = _start_tracking(hidden, size, positions, source, trace_source)
        hidden, size = merge_weighted(step, hidden, size, merge.mode if merge is not None else "mean")
        positions = step.new_positions(num_tokens).gather(1, positions)
        if source is not None:
            source = step.merge(source, reduce="amax")
        if bipartite:
            metric = step.merge(metric)  # the keys of the survivors, for the matching
    if bipartite:
        return reduce_tokens(hidden, metric, size, positions, source, prune_kept - merge_kept, protected, trace_source,
                             merge)
    return hidden, size, positions, source


def reduce_layer_tokens(
    hidden: torch.Tensor,
    metric: torch.Tensor | None,
    class_scores: torch.Tensor | None,
    size: torch.Tensor | None,
    positions: torch.Tensor | None,
    source: torch.Tensor | None,
    r: int,
    tome_kept: LayerKept | None,
    protected: int,
    trace_source: bool = False,
    merge: LayerMerge | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The one reducer a layer calls after its attention: ToMe (``tome_kept`` None), prune+merge, or relaxed.

    ``class_scores`` is the class attention the layer's attention returned for ``need_class_attention=True``.
    ``merge`` is the layer's ``tome_merge`` (rule and mode; None: ToMe's). The relaxed step of the differentiable
    rate search keeps its own size-weighted mixing whatever the mode.
    """
    if tome_kept is None or class_scores is None:
        return reduce_tokens(hidden, metric, size, positions, source, r, protected, trace_source, merge)
    if isinstance(tome_kept, SoftKept):
        if size is None:
            size = torch.ones(hidden.shape[0], hidden.shape[1], 1, dtype=torch.float32, device=hidden.device)
        hidden, size = soft_prune_merge(hidden, size, class_scores, metric, tome_kept.keep, tome_kept.prune,
                                        tome_kept.slots, protected)
        return hidden, size, positions, source
    return prune_merge_tokens(hidden, metric, class_scores, size, positions, source, tome_kept.prune_kept,
                              tome_kept.merge_kept, protected, trace_source, tome_kept.merge_match, merge)


def weighted_token_mean(tokens: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens [B, N, C] in which a merged token counts as many times as its size.

    The weighted sum runs in float32 with the float32 sizes; the mean comes back in the dtype of ``tokens``.
    """
    if size is None:
        return tokens.mean(dim=1)
    size = size.float()
    return ((tokens.float() * size).sum(dim=1) / size.sum(dim=1)).to(tokens.dtype)
