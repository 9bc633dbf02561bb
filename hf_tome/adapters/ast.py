"""Audio Spectrogram Transformer (AST) adapter: ``ASTModel`` and ``ASTForAudioClassification``.

AST is a DeiT-style encoder over spectrogram patches: a class token (0) and a distillation token (1) lead the
sequence, both protected, so the pooled output ``(x[:, 0] + x[:, 1]) / 2`` reads two unmerged tokens.
Block: ``x = x + attn(layernorm_before(x)); x = merge(x); x = x + mlp(layernorm_after(x))``.
"""

import torch
from transformers.models.audio_spectrogram_transformer import modeling_audio_spectrogram_transformer as ast_hf
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from hf_tome.core.macs import EncoderShape
from hf_tome.core.plan import ReductionPlan
from hf_tome.integration.encoder import (
    KeyMetricAttentionMixin,
    PreNormReduceLayerMixin,
    TokenMergeOutput,
    encode_and_pool,
)
from hf_tome.integration.mixin import ToMeModelMixin
from hf_tome.integration.registry import Adapter, register_adapter

# Class token and distillation token.
_PROTECTED = 2


class ToMeASTAttention(KeyMetricAttentionMixin, ast_hf.ASTAttention):
    """AST attention that also returns its head-averaged keys (the merge metric)."""

    _eager_attention = staticmethod(ast_hf.eager_attention_forward)


class ToMeASTLayer(PreNormReduceLayerMixin, ast_hf.ASTLayer):
    """AST layer with a token reduction between the attention and the MLP."""


class ToMeASTModel(ToMeModelMixin, ast_hf.ASTModel):
    """``ASTModel`` running hf_tome's encoder loop; returns a :class:`TokenMergeOutput`."""

    _tome_plan: ReductionPlan

    # Same decorators as the stock forward, so hidden states and attentions are recorded per layer as usual.
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, input_values: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> TokenMergeOutput:
        embedding_output = self.embeddings(input_values=input_values)
        # Both summary tokens are protected: they are still at positions 0 and 1, each of size 1.
        return encode_and_pool(self, embedding_output, attention_mask,
                               lambda sequence: (sequence[:, 0] + sequence[:, 1]) / 2, **kwargs)


class ToMeASTForAudioClassification(ToMeModelMixin, ast_hf.ASTForAudioClassification):
    """``ASTForAudioClassification``; its head reads the pooled output, which merging leaves well defined."""


def _num_patches(config) -> int:
    # Same convolution arithmetic as ``ASTEmbeddings.get_shape`` (patches overlap when stride < patch).
    frequency = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    time = (config.max_length - config.patch_size) // config.time_stride + 1
    return frequency * time


def _encoder_shape(model, image_size: tuple[int, int] | None) -> EncoderShape:
    """Sizes for MACs accounting; ``image_size`` is ignored: the position embeddings fix the spectrogram size."""
    config = model.config
    head = getattr(getattr(model, "classifier", None), "dense", None)
    return EncoderShape(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_patches=_num_patches(config),
        protected=_PROTECTED,
        # One input channel (the spectrogram).
        patch_macs_per_patch=config.patch_size * config.patch_size * config.hidden_size,
        head_macs=head.in_features * head.out_features if isinstance(head, torch.nn.Linear) else 0,
    )


def _loop_module(model):
    return model if isinstance(model, ast_hf.ASTModel) else model.audio_spectrogram_transformer


register_adapter(Adapter(
    family="ast",
    class_map={
        ast_hf.ASTAttention: ToMeASTAttention,
        ast_hf.ASTLayer: ToMeASTLayer,
        ast_hf.ASTModel: ToMeASTModel,
        ast_hf.ASTForAudioClassification: ToMeASTForAudioClassification,
    },
    supported=(ast_hf.ASTModel, ast_hf.ASTForAudioClassification),
    protected_tokens=lambda config: _PROTECTED,
    loop_module=_loop_module,
    encoder_shape=_encoder_shape,
    supports_pruning=True,  # the class token (index 0) ranks tokens by class attention
))
