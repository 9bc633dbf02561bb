"""Dinov2 family adapter: Dinov2 and Dinov2 with registers (class and register tokens protected).

Block: ``x = x + ls1(attn(norm1(x))); x = reduce(x); x = x + ls2(mlp(norm2(x)))`` (ToMe, or prune + merge).
The classification head averages patch tokens, which becomes a size-weighted average once tokens are merged.
"""

import torch
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.dinov2 import modeling_dinov2 as dinov2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as dinov2_reg
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from hf_tome.core.macs import EncoderShape
from hf_tome.core.plan import ReductionPlan
from hf_tome.core.reduce import weighted_token_mean
from hf_tome.integration.encoder import (
    KeyMetricAttentionMixin,
    PreNormReduceLayerMixin,
    TokenMergeOutput,
    bidirectional_mask,
    plan_for_call,
    run_layers,
)
from hf_tome.integration.mixin import ToMeModelMixin
from hf_tome.integration.registry import Adapter, register_adapter


class _Dinov2LayerMixin(PreNormReduceLayerMixin):
    """The shared pre-norm reduce-layer forward with Dinov2's norms, layer scales and drop path."""

    def _attention_input(self, hidden_states):
        return self.norm1(hidden_states)

    def _attention_branch(self, attn_output):
        return self.drop_path(self.layer_scale1(attn_output))

    def _mlp_branch(self, hidden_states):
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states))))


class _Dinov2EncoderMixin:
    _tome_plan: ReductionPlan

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> TokenMergeOutput:
        hidden, size, positions, source = run_layers(self.layer, hidden_states, plan_for_call(self, kwargs),
                                                     attention_mask, **kwargs)
        return TokenMergeOutput(last_hidden_state=hidden, token_sizes=size, token_positions=positions,
                                token_source=source)


class _Dinov2ModelMixin(ToMeModelMixin):
    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor | None = None, bool_masked_pos: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]) -> TokenMergeOutput:
        embedding_output = self.embeddings(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos)
        attention_mask = bidirectional_mask(self.config, embedding_output, attention_mask)
        encoded: TokenMergeOutput = self.encoder(embedding_output, attention_mask=attention_mask, **kwargs)
        sequence_output = self.layernorm(encoded.last_hidden_state)
        return TokenMergeOutput(
            last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0, :],
            hidden_states=encoded.hidden_states, attentions=encoded.attentions, token_sizes=encoded.token_sizes,
            token_positions=encoded.token_positions, token_source=encoded.token_source,
        )


class _Dinov2ClassifierMixin(ToMeModelMixin):
    """Classification head on ``[cls, mean of patch tokens]``, the mean weighted by token size."""

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> ImageClassifierOutput:
        outputs: TokenMergeOutput = self.base_model(pixel_values, attention_mask=attention_mask, **kwargs)
        sequence_output = outputs.last_hidden_state
        prefix = self._prefix_tokens()
        sizes = outputs.token_sizes[:, prefix:] if outputs.token_sizes is not None else None
        linear_input = torch.cat([sequence_output[:, 0], weighted_token_mean(sequence_output[:, prefix:], sizes)],
                                 dim=1)
        logits = self.classifier(linear_input)
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)

    def _prefix_tokens(self) -> int:
        return 1 + getattr(self.config, "num_register_tokens", 0)


class ToMeDinov2Attention(KeyMetricAttentionMixin, dinov2.Dinov2Attention):
    _eager_attention = staticmethod(dinov2.eager_attention_forward)


class ToMeDinov2Layer(_Dinov2LayerMixin, dinov2.Dinov2Layer):
    pass


class ToMeDinov2Encoder(_Dinov2EncoderMixin, dinov2.Dinov2Encoder):
    pass


class ToMeDinov2Model(_Dinov2ModelMixin, dinov2.Dinov2Model):
    pass


class ToMeDinov2ForImageClassification(_Dinov2ClassifierMixin, dinov2.Dinov2ForImageClassification):
    pass


class ToMeDinov2WithRegistersAttention(KeyMetricAttentionMixin, dinov2_reg.Dinov2WithRegistersAttention):
    _eager_attention = staticmethod(dinov2_reg.eager_attention_forward)


class ToMeDinov2WithRegistersLayer(_Dinov2LayerMixin, dinov2_reg.Dinov2WithRegistersLayer):
    pass


class ToMeDinov2WithRegistersEncoder(_Dinov2EncoderMixin, dinov2_reg.Dinov2WithRegistersEncoder):
    pass


class ToMeDinov2WithRegistersModel(_Dinov2ModelMixin, dinov2_reg.Dinov2WithRegistersModel):
    pass


class ToMeDinov2WithRegistersForImageClassification(
    _Dinov2ClassifierMixin, dinov2_reg.Dinov2WithRegistersForImageClassification
):
    pass


def _protected(config) -> int:
    return 1 + getattr(config, "num_register_tokens", 0)


def _encoder_shape(model, image_size: tuple[int, int] | None) -> EncoderShape:
    config = model.config
    # Dinov2 interpolates its position grid, so any input size works; default to the config's.
    height, width = image_size or (config.image_size, config.image_size)
    patch = config.patch_size
    classifier = getattr(model, "classifier", None)
    head_macs = classifier.in_features * classifier.out_features if hasattr(classifier, "out_features") else 0
    intermediate = int(config.hidden_size * config.mlp_ratio)
    return EncoderShape(
        hidden_size=config.hidden_size,
        intermediate_size=intermediate,
        num_layers=config.num_hidden_layers,
        num_patches=(height // patch) * (width // patch),
        protected=_protected(config),
        patch_macs_per_patch=config.num_channels * patch * patch * config.hidden_size,
        head_macs=head_macs,
    )


def _loop_module(model):
    return model.encoder if hasattr(model, "encoder") else model.base_model.encoder


register_adapter(Adapter(
    family="dinov2",
    class_map={
        dinov2.Dinov2Attention: ToMeDinov2Attention,
        dinov2.Dinov2Layer: ToMeDinov2Layer,
        dinov2.Dinov2Encoder: ToMeDinov2Encoder,
        dinov2.Dinov2Model: ToMeDinov2Model,
        dinov2.Dinov2ForImageClassification: ToMeDinov2ForImageClassification,
        dinov2_reg.Dinov2WithRegistersAttention: ToMeDinov2WithRegistersAttention,
        dinov2_reg.Dinov2WithRegistersLayer: ToMeDinov2WithRegistersLayer,
        dinov2_reg.Dinov2WithRegistersEncoder: ToMeDinov2WithRegistersEncoder,
        dinov2_reg.Dinov2WithRegistersModel: ToMeDinov2WithRegistersModel,
        dinov2_reg.Dinov2WithRegistersForImageClassification: ToMeDinov2WithRegistersForImageClassification,
    },
    supported=(dinov2.Dinov2Model, dinov2.Dinov2ForImageClassification, dinov2_reg.Dinov2WithRegistersModel,
               dinov2_reg.Dinov2WithRegistersForImageClassification),
    protected_tokens=_protected,
    loop_module=_loop_module,
    encoder_shape=_encoder_shape,
    supports_pruning=True,
))
