"""VideoMAE adapter: ``VideoMAEModel`` and ``VideoMAEForVideoClassification``.

VideoMAE has no class token: every token is a tubelet carrying a fixed sinusoidal position embedding, added
once before the encoder (so merged tokens simply average their positions, as in ToMe's video experiments).
With mean pooling (``config.use_mean_pooling``, the fine-tuned checkpoints) no token is protected and the
classifier's mean becomes size-weighted, so it still averages over the original tubelets. Without mean pooling
the classifier reads ``x[:, 0]`` as the summary, so that token is protected to keep its meaning.

Block: ``x = x + attn(layernorm_before(x)); x = merge(x); x = x + mlp(layernorm_after(x))``. The attention keeps
VideoMAE's own layout (``query``/``key``/``value`` modules, no key bias, output projection in a separate
module), so it gets its own forward rather than ``KeyMetricAttentionMixin``.
"""

import torch
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.videomae import modeling_videomae as videomae
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from hf_tome.core.macs import EncoderShape
from hf_tome.core.plan import LayerMerge, ReductionPlan
from hf_tome.core.reduce import proportional_attention_mask, reduce_tokens, weighted_token_mean
from hf_tome.integration.encoder import TokenMergeOutput, plan_for_call, run_layers
from hf_tome.integration.mixin import ToMeModelMixin
from hf_tome.integration.registry import Adapter, register_adapter


class ToMeVideoMAESelfAttention(videomae.VideoMAESelfAttention):
    """VideoMAE self-attention taking an additive mask and also returning its head-averaged keys."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                need_keys: bool = False,
                **kwargs: Unpack[TransformersKwargs]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        # Modules are called (not their weights used directly) so wrappers such as LoRA contribute to the keys.
        keys = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        queries = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          videomae.eager_attention_forward)
        context, probs = attention(
            self, queries, keys, values, attention_mask, scaling=self.scaling,
            dropout=0.0 if not self.training else self.dropout_prob, **kwargs,
        )
        context = context.reshape(*input_shape, self.all_head_size)
        return context, probs, (keys.mean(dim=1) if need_keys else None)


class ToMeVideoMAEAttention(videomae.VideoMAEAttention):
    """Self-attention plus output projection, passing the mask in and the keys out."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                need_keys: bool = False,
                **kwargs: Unpack[TransformersKwargs]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        context, probs, keys = self.attention(hidden_states, attention_mask, need_keys=need_keys, **kwargs)
        return self.output(hidden_states=context, input_tensor=hidden_states), probs, keys


class ToMeVideoMAELayer(videomae.VideoMAELayer):
    """VideoMAE layer with a token reduction between the attention and the MLP."""

    def forward(self, hidden_states, attention_mask=None, size=None, positions=None, source=None, *,
                tome_r: int = 0, protected: int = 0, prop_attn: bool = True, trace_source: bool = False,
                tome_merge: LayerMerge | None = None, **kwargs: Unpack[TransformersKwargs]):
        mask = proportional_attention_mask(attention_mask, size, prop_attn, hidden_states.dtype)
        attn_output, _, metric = self.attention(self.layernorm_before(hidden_states), mask, need_keys=tome_r > 0,
                                                **kwargs)
        hidden_states = attn_output + hidden_states
        hidden_states, size, positions, source = reduce_tokens(
            hidden_states, metric, size, positions, source, tome_r, protected, trace_source, tome_merge
        )
        # ``self.output`` adds the residual itself.
        layer_output = self.output(hidden_states=self.intermediate(self.layernorm_after(hidden_states)),
                                   input_tensor=hidden_states)
        return layer_output, size, positions, source


class ToMeVideoMAEModel(ToMeModelMixin, videomae.VideoMAEModel):
    """``VideoMAEModel`` running hf_tome's encoder loop; returns a :class:`TokenMergeOutput`.

    Without mean pooling ``last_hidden_state`` is layer-normed as in the stock model; with it, average the
    tokens weighted by ``token_sizes`` (see ``hf_tome.integration.encoder.weighted_token_mean``).
    """

    _tome_plan: ReductionPlan

    # Same decorators as the stock forward, so hidden states and attentions are recorded per layer as usual.
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> TokenMergeOutput:
        embedding_output = self.embeddings(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos)
        # VideoMAE takes no attention mask: the only mask is the proportional-attention bias made per layer.
        hidden, size, positions, source = run_layers(self.encoder.layer, embedding_output,
                                                     plan_for_call(self, kwargs), None, **kwargs)
        if self.layernorm is not None:
            hidden = self.layernorm(hidden)
        return TokenMergeOutput(last_hidden_state=hidden, token_sizes=size, token_positions=positions,
                                token_source=source)


class ToMeVideoMAEForVideoClassification(ToMeModelMixin, videomae.VideoMAEForVideoClassification):
    """Video classifier whose mean pooling counts a merged token as many times as its size."""

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> ImageClassifierOutput:
        outputs: TokenMergeOutput = self.videomae(pixel_values, **kwargs)
        sequence_output = outputs.last_hidden_state
        if self.fc_norm is not None:
            pooled = self.fc_norm(weighted_token_mean(sequence_output, outputs.token_sizes))
        else:
            pooled = sequence_output[:, 0]  # protected when there is no mean pooling
        logits = self.classifier(pooled)
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


def _protected(config) -> int:
    return 0 if config.use_mean_pooling else 1


def _encoder_shape(model, image_size: tuple[int, int] | None) -> EncoderShape:
    """Sizes for MACs accounting at frame size ``image_size`` (height, width); frames come from the config.

    Counts the full clip; with ``bool_masked_pos`` (pre-training) fewer tokens enter the encoder.
    ``EncoderShape`` counts protected tokens on top of the patches, but VideoMAE's protected token 0 (no mean
    pooling) is itself a tubelet, so it is left out of ``num_patches``: token counts stay exact and the
    embedding MACs miss that one tubelet (under 0.1% of the embedding, about 1e-5 of the model).
    """
    config = model.config
    size = config.image_size
    height, width = image_size or ((size, size) if isinstance(size, int) else tuple(size))
    patch = config.patch_size
    classifier = getattr(model, "classifier", None)
    protected = _protected(config)
    return EncoderShape(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_patches=(config.num_frames // config.tubelet_size) * (height // patch) * (width // patch) - protected,
        protected=protected,
        patch_macs_per_patch=config.num_channels * config.tubelet_size * patch * patch * config.hidden_size,
        head_macs=classifier.in_features * classifier.out_features if isinstance(classifier, torch.nn.Linear) else 0,
    )


def _loop_module(model):
    return model if isinstance(model, videomae.VideoMAEModel) else model.videomae


register_adapter(Adapter(
    family="videomae",
    class_map={
        videomae.VideoMAESelfAttention: ToMeVideoMAESelfAttention,
        videomae.VideoMAEAttention: ToMeVideoMAEAttention,
        videomae.VideoMAELayer: ToMeVideoMAELayer,
        videomae.VideoMAEModel: ToMeVideoMAEModel,
        videomae.VideoMAEForVideoClassification: ToMeVideoMAEForVideoClassification,
    },
    supported=(videomae.VideoMAEModel, videomae.VideoMAEForVideoClassification),
    protected_tokens=_protected,
    loop_module=_loop_module,
    encoder_shape=_encoder_shape,
))
