"""Pieces shared by the adapters of pre-norm ViT-style encoders (one block = attention, reduce, MLP).

Token sizes, positions and sources travel explicitly through one encoder loop (:func:`run_layers`) as
positional arguments of every layer call, never in module state: gradient checkpointing recomputes a layer
from its arguments, so shared mutable state would be read twice.

A layer reduces its tokens with :func:`reduce_layer_tokens`: ToMe merging of ``tome_r`` tokens, or, when the
encoder loop hands it ``tome_kept`` (a plan with per-layer kept counts), pruning by class attention followed by
merging (into the most similar kept token by class-attention rank, or by ToMe's bipartite matching). An adapter
opts in to the second with ``Adapter(supports_pruning=True)``: its layer accepts ``tome_kept``, asks its
attention for ``need_class_attention`` and calls ``reduce_layer_tokens``.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from ..ops import (
    bipartite_soft_matching,
    class_attention,
    initial_positions,
    merge_source,
    merge_weighted,
    prune_and_merge,
    soft_prune_merge,
)
from ..schedule import clamp_r, effective_kept


@dataclass(frozen=True)
class SoftKept:
    """Relaxed kept counts of one layer (differentiable rate search), indexed by class-attention rank.

    keep: [N] probability that the token of rank j stays itself, P(merge_kept > j).
    prune: [N] probability that it survives pruning, P(prune_kept > j); ``prune - keep`` of it is merged.
    slots: merged tokens go to their most similar token among the top ``slots`` ranks.
    """

    keep: torch.Tensor
    prune: torch.Tensor
    slots: int


@dataclass(frozen=True)
class HardKept:
    """Kept counts of one layer: prune to ``prune_kept`` by class attention, then merge down to ``merge_kept``.

    ``merge_match="class_attention"`` (the spec's rule) merges the tokens ranked between ``merge_kept`` and
    ``prune_kept`` into their most similar higher-ranked token; ``"bipartite"`` merges the survivors of pruning by
    ToMe's bipartite soft matching instead (the most similar pairs go first), which suits models whose head
    averages the tokens, where class attention says little about which tokens are redundant.
    """

    prune_kept: int
    merge_kept: int
    merge_match: str = "class_attention"


LayerKept = HardKept | SoftKept
"""What :func:`run_layers` hands a layer as ``tome_kept``: a :class:`HardKept` or a :class:`SoftKept`."""


@dataclass
class ReductionPlan:
    """What the encoder loop does in each layer; derived from a ``ToMeConfig`` by ``hf_tome.apply``.

    ``layer_r`` drives ToMe merging. ``prune_kept``/``merge_kept`` (unified compression, one count per layer)
    or ``soft_kept`` (the differentiable search) switch a layer to prune-then-merge by class attention; the
    first layer is never compressed. Adapters that support them accept a ``tome_kept`` keyword (see
    :func:`run_layers`); adapters that do not are never handed one.
    """

    layer_r: list[int]
    protected: int
    prop_attn: bool = True
    trace_source: bool = False
    prune_kept: list[int] | None = None
    merge_kept: list[int] | None = None
    soft_kept: list[SoftKept | None] | None = None
    merge_match: str = "class_attention"

    def kept_for_layer(self, index: int) -> LayerKept | None:
        """The ``tome_kept`` argument of layer ``index`` (None: plain ToMe with ``layer_r[index]``)."""
        if index == 0:  # block 0 is never compressed
            return None
        if self.soft_kept is not None:
            return self.soft_kept[index]
        if self.prune_kept is not None:
            return HardKept(self.prune_kept[index], self.merge_kept[index], self.merge_match)
        return None


@dataclass
class TokenMergeOutput(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` plus what a merged sequence needs to be read correctly.

    token_sizes: [B, N, 1] how many original tokens each output token stands for (None when nothing merged);
        float32 whatever the model dtype, so the counts stay exact.
    token_positions: [B, N_orig] index of the output token holding each original token (for unmerging).
    token_source: [B, N, N_orig] 0/1 membership matrix (float32), when ``trace_source`` is on.
    """

    token_sizes: torch.Tensor | None = None
    token_positions: torch.Tensor | None = None
    token_source: torch.Tensor | None = None


class KeyMetricAttentionMixin:
    """Forward of a ``q_proj/k_proj/v_proj/o_proj`` attention module that also returns its head-averaged keys.

    The projections are called as modules, so adapters such as LoRA that wrap them contribute to the keys.
    Subclasses set ``_eager_attention`` to their family's eager function (the fallback transformers uses).
    """

    _eager_attention: Callable

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, need_keys: bool = False,
        need_class_attention: bool = False, **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, ...]:
        """Returns ``(output, weights, keys)``, plus the class attention [B, N] when ``need_class_attention``."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, type(self)._eager_attention)
        attn_output, attn_weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        keys = key.mean(dim=1) if need_keys else None
        if need_class_attention:
            # Only the class-token query row: the full attention above stays in the fused kernel.
            return attn_output, attn_weights, keys, class_attention(query[:, :, 0], key, self.scaling, attention_mask)
        return attn_output, attn_weights, keys


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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Merge ``r`` tokens of ``hidden`` (size-weighted) and carry sizes, positions and sources along."""
    num_tokens = hidden.shape[1]
    r = clamp_r(r, num_tokens, protected)
    if r == 0 or metric is None:
        return hidden, size, positions, source
    matching = bipartite_soft_matching(metric, r, protected)
    size, positions, source = _start_tracking(hidden, size, positions, source, trace_source)
    hidden, size = merge_weighted(matching, hidden, size)
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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Prune to ``prune_kept`` tokens by class attention, then merge down to ``merge_kept`` (size-weighted).

    ``merge_match="class_attention"`` merges the tokens ranked between the two counts into their most similar
    kept token; ``"bipartite"`` merges the survivors of pruning by ToMe's bipartite soft matching, which removes
    at most half of the unprotected tokens (``hf_tome.apply`` refuses counts that need more, so the count here is
    exact and the FLOPs accounting holds). Counts above the tokens present never reach here: ``apply`` refuses them
    for layers 1 and up, and :func:`run_layers` for layer 0's input. Pruned patches are held by no token in
    ``source``; ``positions`` sends them to their most similar kept token, so unmerging still fills the grid.
    """
    num_tokens = hidden.shape[1]
    prune_kept, merge_kept = effective_kept(num_tokens, prune_kept, merge_kept)
    bipartite = merge_match == "bipartite"
    # Bipartite matching takes only the pruning from the class-attention step: it merges the survivors itself.
    ranked_kept = prune_kept if bipartite else merge_kept
    if ranked_kept < num_tokens:
        step = prune_and_merge(class_scores, metric, prune_kept, ranked_kept, protected)
        size, positions, source = _start_tracking(hidden, size, positions, source, trace_source)
        hidden, size = merge_weighted(step, hidden, size)
        positions = step.new_positions(num_tokens).gather(1, positions)
        if source is not None:
            source = step.merge(source, reduce="amax")
        if bipartite:
            metric = step.merge(metric)  # the keys of the survivors, for the matching
    if bipartite:
        return reduce_tokens(hidden, metric, size, positions, source, prune_kept - merge_kept, protected, trace_source)
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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The one reducer a layer calls after its attention: ToMe (``tome_kept`` None), prune+merge, or relaxed.

    ``class_scores`` is the class attention the layer's attention returned for ``need_class_attention=True``.
    """
    if tome_kept is None or class_scores is None:
        return reduce_tokens(hidden, metric, size, positions, source, r, protected, trace_source)
    if isinstance(tome_kept, SoftKept):
        if size is None:
            size = torch.ones(hidden.shape[0], hidden.shape[1], 1, dtype=torch.float32, device=hidden.device)
        hidden, size = soft_prune_merge(hidden, size, class_scores, metric, tome_kept.keep, tome_kept.prune,
                                        tome_kept.slots, protected)
        return hidden, size, positions, source
    return prune_merge_tokens(hidden, metric, class_scores, size, positions, source, tome_kept.prune_kept,
                              tome_kept.merge_kept, protected, trace_source, tome_kept.merge_match)



class PreNormReduceLayerMixin:
    """Forward of a pre-norm layer with the token reduction between attention and MLP.

    The defaults fit the ViT layout (``layernorm_before``/``layernorm_after``, ``attention``, ``mlp``, ``dropout``:
    ViT, DeiT, AST and ViViT); a family with other names or layer scales (Dinov2) overrides the three branch hooks.
    """

    def _attention_input(self, hidden_states):
        return self.layernorm_before(hidden_states)

    def _attention_branch(self, attn_output):
        return self.dropout(attn_output)

    def _mlp_branch(self, hidden_states):
        return self.dropout(self.mlp(self.layernorm_after(hidden_states)))

    def forward(self, hidden_states, attention_mask=None, size=None, positions=None, source=None, *,
                tome_r: int = 0, protected: int = 1, prop_attn: bool = True, trace_source: bool = False,
                tome_kept: LayerKept | None = None, **kwargs: Unpack[TransformersKwargs]):
        residual = hidden_states
        mask = proportional_attention_mask(attention_mask, size, prop_attn, hidden_states.dtype)
        need_class = needs_class_attention(tome_kept, hidden_states.shape[1])
        attn_output, _, metric, *class_scores = self.attention(
            self._attention_input(hidden_states), attention_mask=mask, need_keys=tome_r > 0 or need_class,
            need_class_attention=need_class, **kwargs,
        )
        hidden_states = self._attention_branch(attn_output) + residual
        hidden_states, size, positions, source = reduce_layer_tokens(
            hidden_states, metric, class_scores[0] if need_class else None, size, positions, source, tome_r,
            tome_kept, protected, trace_source,
        )
        hidden_states = self._mlp_branch(hidden_states) + hidden_states
        return hidden_states, size, positions, source


def run_layers(
    layers: Sequence[nn.Module],
    hidden: torch.Tensor,
    plan: ReductionPlan,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The one encoder loop: returns the final hidden states with their sizes, positions and sources."""
    if len(plan.layer_r) != len(layers):
        raise ValueError(f"the reduction plan has {len(plan.layer_r)} layers but the encoder has {len(layers)}")
    # Kept counts are absolute: block 0's count is the number of tokens they were made for (later layers are
    # checked against the counts before them by hf_tome.apply).
    if plan.prune_kept is not None and plan.prune_kept[0] > hidden.shape[1]:
        raise ValueError(f"ToMeConfig.prune_kept[0]={plan.prune_kept[0]} is invalid for this input: it has "
                         f"{hidden.shape[1]} tokens entering the model (e.g. an image of another size than the kept "
                         f"counts were made for); expected prune_kept[0] == {hidden.shape[1]}")
    size = positions = source = None
    for index, (layer, r) in enumerate(zip(layers, plan.layer_r, strict=True)):
        # Only layers of a plan with kept counts get ``tome_kept``, so adapters without pruning never see it.
        kept = plan.kept_for_layer(index)
        extra = {"tome_kept": kept} if kept is not None else {}
        # Tensors go positionally so gradient checkpointing (reentrant too) tracks them.
        hidden, size, positions, source = layer(
            hidden, attention_mask, size, positions, source,
            tome_r=r, protected=plan.protected, prop_attn=plan.prop_attn, trace_source=plan.trace_source,
            **extra, **kwargs,
        )
    if plan.trace_source and source is None:
        batch, num_tokens, _ = hidden.shape
        source = torch.eye(num_tokens, dtype=torch.float32, device=hidden.device).expand(batch, -1, -1)
    return hidden, size, positions, source



def encode_and_pool(model: nn.Module, embedding_output: torch.Tensor, attention_mask: torch.Tensor | None,
                    pool: Callable[[torch.Tensor], torch.Tensor | None], **kwargs) -> TokenMergeOutput:
    """The body of a ViT-style base model after its embeddings: the bidirectional mask, hf_tome's encoder loop
    over ``model.layers``, the final ``model.layernorm`` and ``pool`` on the normalised sequence."""
    attention_mask = create_bidirectional_mask(
        config=model.config, inputs_embeds=embedding_output, attention_mask=attention_mask
    )
    hidden, size, positions, source = run_layers(model.layers, embedding_output, model._tome_plan, attention_mask,
                                                 **kwargs)
    sequence_output = model.layernorm(hidden)
    return TokenMergeOutput(last_hidden_state=sequence_output, pooler_output=pool(sequence_output),
                            token_sizes=size, token_positions=positions, token_source=source)


def weighted_token_mean(tokens: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens [B, N, C] in which a merged token counts as many times as its size.

    The weighted sum runs in float32 with the float32 sizes; the mean comes back in the dtype of ``tokens``.
    """
    if size is None:
        return tokens.mean(dim=1)
    size = size.float()
    return ((tokens.float() * size).sum(dim=1) / size.sum(dim=1)).to(tokens.dtype)
