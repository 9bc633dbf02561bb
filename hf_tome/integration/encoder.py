"""Pieces shared by the adapters of pre-norm ViT-style encoders (one block = attention, reduce, MLP).

Token sizes, positions and sources travel explicitly through one encoder loop (:func:`run_layers`) as
positional arguments of every layer call, never in module state: gradient checkpointing recomputes a layer
from its arguments, so shared mutable state would be read twice.

A layer reduces its tokens with :func:`reduce_layer_tokens`: ToMe merging of ``tome_r`` tokens, or, when the
encoder loop hands it ``tome_kept`` (a plan with per-layer kept counts), pruning by class attention followed by
merging (into the most similar kept token by class-attention rank, or by ToMe's bipartite matching). An adapter
opts in to the second with ``Adapter(supports_pruning=True)``: its layer accepts ``tome_kept``, asks its
attention for ``need_class_attention`` and calls ``reduce_layer_tokens``.

A plan whose merge rule or mode is not ToMe's (PiToMe, MLERP) hands every layer a ``tome_merge``
(:class:`~hf_tome.core.plan.LayerMerge`); :class:`PreNormReduceLayerMixin` passes it on to ``reduce_layer_tokens``.
A family opts in by a layer ``forward`` that takes ``tome_merge`` (``hf_tome.apply`` refuses the options for
families whose layers do not).
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

from hf_tome.core.ops import class_attention
from hf_tome.core.plan import LayerKept, LayerMerge, ReductionPlan
from hf_tome.core.reduce import needs_class_attention, proportional_attention_mask, reduce_layer_tokens


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
                tome_kept: LayerKept | None = None, tome_merge: LayerMerge | None = None,
                **kwargs: Unpack[TransformersKwargs]):
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
            tome_kept, protected, trace_source, tome_merge,
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
                         f"counts were made for); expected prune_kept[0] <= {hidden.shape[1]}")
    size = positions = source = None
    for index, (layer, r) in enumerate(zip(layers, plan.layer_r, strict=True)):
        # Only layers of a plan with kept counts get ``tome_kept``, so adapters without pruning never see it.
        kept, merge = plan.kept_for_layer(index), plan.merge_for_layer(index)
        extra = {"tome_kept": kept} if kept is not None else {}
        if merge is not None:  # likewise only for a merge rule or mode other than ToMe's
            extra["tome_merge"] = merge
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



def plan_for_call(loop_module: nn.Module, kwargs: dict, plan_type: type[ReductionPlan] = ReductionPlan
                  ) -> ReductionPlan:
    """The plan of this forward: its ``tome_plan=`` keyword, else the model's default (set by ``hf_tome.apply``).

    The keyword is taken out of ``kwargs``, so it never reaches attention functions or stock submodules. The plan's
    type must be ``plan_type`` exactly: a family's own plan (``SwinReductionPlan``) subclasses ``ReductionPlan`` but
    means something else to another family's encoder loop.
    """
    plan = kwargs.pop("tome_plan", None)
    if plan is None:
        return loop_module._tome_plan
    if type(plan) is not plan_type:
        raise TypeError(f"tome_plan={type(plan).__name__} is invalid for {type(loop_module).__name__}: expected a "
                        f"{plan_type.__name__} made by hf_tome.build_plan(model, config) for this model")
    default = loop_module.__dict__.get("_tome_plan")
    if default is not None and plan.protected != default.protected:
        # e.g. a ViT plan (1 protected token) on DeiT (2): the distillation token would be merged away silently
        raise ValueError(f"tome_plan protects {plan.protected} token(s) but {type(loop_module).__name__} has "
                         f"{default.protected}: expected a plan made by hf_tome.build_plan(model, config) for this "
                         "model")
    return plan


def bidirectional_mask(config, embeddings: torch.Tensor, attention_mask: torch.Tensor | None):
    """The attention mask of an encoder over ``embeddings``: None without a user mask, else transformers' own.

    These encoders pad nothing, so no ``attention_mask`` means every token attends to every token: no mask at all.
    ``create_bidirectional_mask`` returns None for that too, except under ``torch.export`` and ``torch.onnx.export``,
    where it cannot inspect the mask and materialises an all-true one (which merged tokens would then refuse). A
    mask the user gives still goes through it, and is still refused once tokens merge.
    """
    if attention_mask is None:
        return None
    return create_bidirectional_mask(config=config, inputs_embeds=embeddings, attention_mask=attention_mask)


def encode_and_pool(model: nn.Module, embedding_output: torch.Tensor, attention_mask: torch.Tensor | None,
                    pool: Callable[[torch.Tensor], torch.Tensor | None], **kwargs) -> TokenMergeOutput:
    """The body of a ViT-style base model after its embeddings: the bidirectional mask, hf_tome's encoder loop
    over ``model.layers``, the final ``model.layernorm`` and ``pool`` on the normalised sequence."""
    attention_mask = bidirectional_mask(model.config, embedding_output, attention_mask)
    plan = plan_for_call(model, kwargs)
    hidden, size, positions, source = run_layers(model.layers, embedding_output, plan, attention_mask, **kwargs)
    sequence_output = model.layernorm(hidden)
    return TokenMergeOutput(last_hidden_state=sequence_output, pooler_output=pool(sequence_output),
                            token_sizes=size, token_positions=positions, token_source=source)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a ViT-style encoder (ViT, DeiT, Dinov2, ...), base model or with a head.

    Looked up by attribute, not through the adapter registry, so it works on stock, patched and subclassed model
    classes alike (``from_pretrained`` may rebuild blocks on a subclass the registry, exact classes only, does not
    know): the base model's ``layers`` (hf_tome's patched ViT-style base models), else its ``encoder.layer``
    (stock ViT, DeiT, Dinov2, ...) or ``encoder.layers`` (Whisper; Swin's stages). ``ValueError`` when there is
    none.
    """
    base = getattr(model, "base_model", model)
    for owner in (base, getattr(base, "encoder", None)):
        for name in ("layers", "layer"):
            layers = getattr(owner, name, None)
            if isinstance(layers, nn.ModuleList):
                return layers
    raise ValueError(f"cannot find the encoder blocks of {type(model).__name__}")
