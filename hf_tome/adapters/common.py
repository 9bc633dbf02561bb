"""Pieces shared by the adapters of pre-norm ViT-style encoders (one block = attention, reduce, MLP).

Token sizes, positions and sources travel explicitly through one encoder loop (:func:`run_layers`) as
positional arguments of every layer call, never in module state: gradient checkpointing recomputes a layer
from its arguments, so shared mutable state would be read twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..ops import bipartite_soft_matching, initial_positions, merge_source, merge_weighted
from ..schedule import clamp_r


@dataclass
class ReductionPlan:
    """What the encoder loop does in each layer; derived from a ``ToMeConfig`` by ``hf_tome.apply``."""

    layer_r: list[int]
    protected: int
    prop_attn: bool = True
    trace_source: bool = False


@dataclass
class TokenMergeOutput(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` plus what a merged sequence needs to be read correctly.

    token_sizes: [B, N, 1] how many original tokens each output token stands for (None when nothing merged).
    token_positions: [B, N_orig] index of the output token holding each original token (for unmerging).
    token_source: [B, N, N_orig] 0/1 membership matrix, when ``trace_source`` is on.
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
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
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
        return attn_output, attn_weights, (key.mean(dim=1) if need_keys else None)


def proportional_attention_mask(
    attention_mask: torch.Tensor | None, size: torch.Tensor | None, prop_attn: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive float mask [B, 1, 1, N] of ``log(size)`` per key token (works for eager and sdpa alike).

    ``size`` None means every token still has size 1, where the bias is zero and the fused path is kept.
    """
    if not prop_attn or size is None:
        return attention_mask
    if attention_mask is not None:
        raise ValueError("hf_tome: attention_mask cannot be combined with merged tokens; expected attention_mask=None")
    return size.log().to(dtype)[:, None, None, :, 0]


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
    batch, num_tokens, _ = hidden.shape
    r = clamp_r(r, num_tokens, protected)
    if r == 0 or metric is None:
        return hidden, size, positions, source
    matching = bipartite_soft_matching(metric, r, protected)
    if size is None:
        size = hidden.new_ones(batch, num_tokens, 1)
    if positions is None:
        positions = initial_positions(batch, num_tokens, hidden.device)
    if trace_source and source is None:
        source = torch.eye(num_tokens, dtype=hidden.dtype, device=hidden.device).expand(batch, -1, -1)
    hidden, size = merge_weighted(matching, hidden, size)
    positions = matching.new_positions(num_tokens).gather(1, positions)
    if source is not None:
        source = merge_source(matching, source)
    return hidden, size, positions, source


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
    size = positions = source = None
    for layer, r in zip(layers, plan.layer_r, strict=True):
        # Tensors go positionally so gradient checkpointing (reentrant too) tracks them.
        hidden, size, positions, source = layer(
            hidden, attention_mask, size, positions, source,
            tome_r=r, protected=plan.protected, prop_attn=plan.prop_attn, trace_source=plan.trace_source, **kwargs,
        )
    if plan.trace_source and source is None:
        batch, num_tokens, _ = hidden.shape
        source = torch.eye(num_tokens, dtype=hidden.dtype, device=hidden.device).expand(batch, -1, -1)
    return hidden, size, positions, source


def weighted_token_mean(tokens: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens [B, N, C] in which a merged token counts as many times as its size."""
    if size is None:
        return tokens.mean(dim=1)
    return (tokens * size).sum(dim=1) / size.sum(dim=1)
