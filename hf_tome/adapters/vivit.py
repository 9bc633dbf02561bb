"""ViViT adapter: ``VivitModel`` and ``VivitForVideoClassification`` (the "spatio-temporal attention" model).

ViViT is a ViT over tubelets (space-time patches) with one class token, which is protected: the pooler and the
classifier read ``x[:, 0]``, which merging never moves or changes.
Block: ``x = x + attn(layernorm_before(x)); x = merge(x); x = x + mlp(layernorm_after(x))``.
"""

import torch
from transformers.models.vivit import modeling_vivit as vivit
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

# The class token.
_PROTECTED = 1


class ToMeVivitAttention(KeyMetricAttentionMixin, vivit.VivitAttention):
    """ViViT attention that also returns its head-averaged keys (the merge metric)."""

    _eager_attention = staticmethod(vivit.eager_attention_forward)


class ToMeVivitLayer(PreNormReduceLayerMixin, vivit.VivitLayer):
    """ViViT layer with a token reduction between the attention and the MLP."""


class ToMeVivitModel(ToMeModelMixin, vivit.VivitModel):
    """``VivitModel`` running hf_tome's encoder loop; returns a :class:`TokenMergeOutput`."""

    _tome_plan: ReductionPlan

    # Same decorators as the stock forward, so hidden states and attentions are recorded per layer as usual.
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False,
                attention_mask: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]) -> TokenMergeOutput:
        embedding_output = self.embeddings(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return encode_and_pool(self, embedding_output, attention_mask,
                               lambda sequence: self.pooler(sequence) if self.pooler is not None else None, **kwargs)


class ToMeVivitForVideoClassification(ToMeModelMixin, vivit.VivitForVideoClassification):
    """``VivitForVideoClassification``; its head reads the protected class token."""


def _encoder_shape(model, image_size: tuple[int, int] | None) -> EncoderShape:
    """Sizes for MACs accounting at frame size ``image_size`` (height, width); frames come from the config."""
    config = model.config
    size = config.image_size
    height, width = image_size or ((size, size) if isinstance(size, int) else tuple(size))
    frames_per_tubelet, patch_height, patch_width = config.tubelet_size
    classifier = getattr(model, "classifier", None)
    return EncoderShape(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_patches=(config.num_frames // frames_per_tubelet) * (height // patch_height) * (width // patch_width),
        protected=_PROTECTED,
        patch_macs_per_patch=config.num_channels * frames_per_tubelet * patch_height * patch_width * config.hidden_size,
        head_macs=classifier.in_features * classifier.out_features if isinstance(classifier, torch.nn.Linear) else 0,
    )


def _loop_module(model):
    return model if isinstance(model, vivit.VivitModel) else model.vivit


register_adapter(Adapter(
    family="vivit",
    class_map={
        vivit.VivitAttention: ToMeVivitAttention,
        vivit.VivitLayer: ToMeVivitLayer,
        vivit.VivitModel: ToMeVivitModel,
        vivit.VivitForVideoClassification: ToMeVivitForVideoClassification,
    },
    supported=(vivit.VivitModel, vivit.VivitForVideoClassification),
    protected_tokens=lambda config: _PROTECTED,
    loop_module=_loop_module,
    encoder_shape=_encoder_shape,
    supports_pruning=True,  # the class token (index 0) ranks tokens by class attention
))
