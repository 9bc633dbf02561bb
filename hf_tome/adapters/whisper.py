"""Whisper adapter: token merging in the encoder of ``WhisperModel`` and ``WhisperForConditionalGeneration``.

Encoder block (pre-norm): ``x = x + attn(self_attn_layer_norm(x)); x = merge(x); x = x + mlp(final_layer_norm(x))``.
The metric is the encoder self-attention's keys averaged over heads. Whisper's encoder has no class token, so
nothing is protected. Merged frames keep their size: encoder self-attention and the decoder's cross-attention
both add ``log(size)`` of each encoder token to their logits (proportional attention), as an additive float mask
``[B, 1, 1, N_enc]`` that eager and sdpa attention treat alike.

How the sizes reach the decoder: the encoder returns a :class:`WhisperEncoderMergeOutput` (a ``BaseModelOutput``
carrying ``token_sizes``). ``generate()`` runs the encoder once and hands that same object back to ``forward`` as
``encoder_outputs`` at every decoding step, so ``ToMeWhisperModel.forward`` rebuilds the cross-attention bias from
it each step. The bias is applied at attention time, so it also holds once the cross-attention keys/values are
served from the cache. The order of merged tokens is not temporal, which is fine: cross-attention has no position
information of its own (positions were added to the encoder input before merging).

A bare ``WhisperEncoder`` is supported too (used for timing the encoder alone). ``WhisperForAudioClassification``
and ``WhisperForCausalLM`` are not.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.whisper import modeling_whisper as whisper
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from hf_tome.core.macs import EncoderShape
from hf_tome.core.plan import LayerMerge, ReductionPlan
from hf_tome.core.reduce import proportional_attention_mask, reduce_tokens
from hf_tome.integration.encoder import plan_for_call, run_layers
from hf_tome.integration.mixin import ToMeModelMixin
from hf_tome.integration.registry import Adapter, register_adapter
from hf_tome.integration.stock_calls import CACHE_ARGUMENTS, named_parameters, stock_arguments, with_stock_signature


@dataclass
class WhisperEncoderMergeOutput(BaseModelOutput):
    """``BaseModelOutput`` of the Whisper encoder plus what the decoder needs to read merged frames.

    A ``BaseModelOutput`` subclass, so Whisper's generation code (which checks for that type) passes it on intact.
    token_sizes: [B, N, 1] how many encoder frames each output token stands for (None when nothing merged);
        float32 whatever the model dtype, so the counts stay exact.
    token_positions: [B, N_orig] index of the output token holding each original frame.
    token_source: [B, N, N_orig] 0/1 membership matrix (float32), when ``trace_source`` is on.
    """

    token_sizes: torch.Tensor | None = None
    token_positions: torch.Tensor | None = None
    token_source: torch.Tensor | None = None


@dataclass
class WhisperMergeModelOutput(Seq2SeqModelOutput):
    """``Seq2SeqModelOutput`` of ``WhisperModel`` plus the encoder token sizes the decoder attended with."""

    encoder_token_sizes: torch.Tensor | None = None


class ToMeWhisperAttention(whisper.WhisperAttention):
    """Whisper attention that can also return its head-averaged keys (encoder self-attention only).

    Without ``need_keys`` it is the stock forward, called with the arguments exactly as given (decoder self- and
    cross-attention use it unchanged, whatever the installed transformers names its cache argument).
    """

    def forward(self, hidden_states: torch.Tensor, *args, need_keys: bool = False,
                **kwargs: Unpack[FlashAttentionKwargs]):
        if not need_keys:
            return super().forward(hidden_states, *args, **kwargs)
        named = stock_arguments(whisper.WhisperAttention.forward, self, (hidden_states, *args), kwargs)
        if named.pop("key_value_states", None) is not None or any(
            named.pop(name, None) is not None for name in CACHE_ARGUMENTS
        ):
            raise ValueError("hf_tome: need_keys is only supported for encoder self-attention (no cache, no cross)")
        attention_mask = named.pop("attention_mask", None)
        named.pop("hidden_states")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        # Same arithmetic as the stock forward (query scaled before the product, scaling=1.0 in the kernel), so
        # merging layers and r=0 layers see numerically identical attention.
        query = (self.q_proj(hidden_states) * self.scaling).view(hidden_shape).transpose(1, 2).contiguous()
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2).contiguous()
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2).contiguous()
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          whisper.eager_attention_forward)
        attn_output, attn_weights = attention(
            self, query, key, value, attention_mask, dropout=0.0 if not self.training else self.dropout,
            scaling=1.0, **named,
        )
        attn_output = self.out_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights, key.mean(dim=1)


class ToMeWhisperEncoderLayer(whisper.WhisperEncoderLayer):
    """Whisper encoder layer with a token reduction between the self-attention and the MLP."""

    def forward(self, hidden_states, attention_mask=None, size=None, positions=None, source=None, *,
                tome_r: int = 0, protected: int = 0, prop_attn: bool = True, trace_source: bool = False,
                tome_merge: LayerMerge | None = None, **kwargs: Unpack[TransformersKwargs]):
        residual = hidden_states
        mask = proportional_attention_mask(attention_mask, size, prop_attn, hidden_states.dtype)
        outputs = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask=mask,
                                 need_keys=tome_r > 0, **kwargs)
        metric = outputs[2] if tome_r > 0 else None
        hidden_states = residual + nn.functional.dropout(outputs[0], p=self.dropout, training=self.training)
        hidden_states, size, positions, source = reduce_tokens(
            hidden_states, metric, size, positions, source, tome_r, protected, trace_source, tome_merge
        )
        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(self.final_layer_norm(hidden_states)))
        hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = nn.functional.dropout(self.fc2(hidden_states), p=self.dropout, training=self.training)
        hidden_states = residual + hidden_states
        if hidden_states.dtype == torch.float16:  # the stock layer's overflow guard
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states, size, positions, source


class ToMeWhisperDecoderLayer(whisper.WhisperDecoderLayer):
    """Whisper decoder layer whose cross-attention takes an additive bias over encoder tokens.

    The stock decoder passes unknown keyword arguments on to its layers, so ``encoder_attention_bias`` given to
    the decoder arrives here without replacing the decoder's own forward. Everything else reaches the stock layer
    by name, as the installed transformers declares it.
    """

    def forward(self, hidden_states: torch.Tensor, *args, encoder_attention_bias: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]):
        if encoder_attention_bias is None:
            return super().forward(hidden_states, *args, **kwargs)
        named = stock_arguments(whisper.WhisperDecoderLayer.forward, self, (hidden_states, *args), kwargs)
        bias = batch_aligned_bias(encoder_attention_bias, hidden_states.shape[0])
        mask = named.get("encoder_attention_mask")
        named["encoder_attention_mask"] = bias if mask is None else mask + bias
        return super().forward(**named)


class ToMeWhisperEncoder(ToMeModelMixin, whisper.WhisperEncoder):
    """``WhisperEncoder`` running hf_tome's encoder loop; returns a :class:`WhisperEncoderMergeOutput`."""

    _tome_plan: ReductionPlan

    # Same decorators as the stock forward, so hidden states and attentions are recorded per layer as usual.
    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_features: torch.Tensor, attention_mask=None, *, tome_plan: ReductionPlan | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> WhisperEncoderMergeOutput:
        # ``tome_plan`` is a named parameter (not only read from **kwargs): ``generate()`` validates its model kwargs
        # against the signatures of the model, its encoder and its decoder, and refuses a keyword none of them names.
        expected_frames = self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if input_features.shape[-1] != expected_frames:
            raise ValueError(f"Whisper expects the mel input features to be of length {expected_frames}, but found "
                             f"{input_features.shape[-1]}; pad the input mel features to {expected_frames}")
        embeds = nn.functional.gelu(self.conv1(input_features))
        embeds = nn.functional.gelu(self.conv2(embeds)).permute(0, 2, 1)
        all_positions = torch.arange(self.embed_positions.num_embeddings, device=embeds.device)
        hidden_states = embeds + self.embed_positions(all_positions)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        layers, plan = list(self.layers), plan_for_call(self, {"tome_plan": tome_plan})
        if self.training and self.layerdrop > 0.0:
            # LayerDrop skips whole layers; their share of the schedule is skipped with them.
            kept = [i for i in range(len(layers)) if not torch.rand([]) < self.layerdrop]
            layers = [layers[i] for i in kept]
            plan = dataclasses.replace(plan, layer_r=[plan.layer_r[i] for i in kept])
        # Whisper never masks encoder frames (its attention_mask argument is ignored by the stock encoder too).
        hidden, size, positions, source = run_layers(layers, hidden_states, plan, None, **kwargs)
        return WhisperEncoderMergeOutput(last_hidden_state=self.layer_norm(hidden), token_sizes=size,
                                         token_positions=positions, token_source=source)


def cross_attention_bias(encoder_outputs, plan: ReductionPlan | None) -> torch.Tensor | None:
    """The decoder's additive cross-attention mask ``log(size)`` [B, 1, 1, N_enc], or None when nothing merged."""
    sizes = getattr(encoder_outputs, "token_sizes", None)
    prop_attn = plan.prop_attn if plan is not None else True
    dtype = encoder_outputs[0].dtype
    return proportional_attention_mask(None, sizes, prop_attn, dtype)


def batch_aligned_bias(bias: torch.Tensor, decoder_batch: int) -> torch.Tensor:
    """``bias`` [B_enc, 1, 1, N] laid out for a decoder batch of ``decoder_batch`` rows.

    The stock cross-attention views the projected encoder states as ``(decoder_batch, -1, heads, head_dim)``, so a
    decoder batch that differs from the encoder's regroups the encoder tokens; the bias is regrouped the same way,
    so every key keeps its own ``log(size)``.
    """
    if bias.shape[0] == decoder_batch:
        return bias
    if bias.numel() % decoder_batch:
        raise ValueError(f"hf_tome: the decoder batch ({decoder_batch}) does not fit the merged encoder output "
                         f"({bias.shape[0]} x {bias.shape[-1]} tokens); expected the encoder's batch size")
    return bias.reshape(decoder_batch, 1, 1, -1)


class ToMeWhisperModel(ToMeModelMixin, whisper.WhisperModel):
    """``WhisperModel`` whose decoder cross-attends to merged encoder tokens with proportional attention.

    Only the encoder call is taken over (so its token sizes can become the cross-attention bias); the stock
    forward does the rest, with every argument passed on by name.
    """

    @with_stock_signature(whisper.WhisperModel.forward)
    def forward(self, *args, **kwargs) -> WhisperMergeModelOutput:
        named = stock_arguments(whisper.WhisperModel.forward, self, args, kwargs)
        extra = {name: named.pop(name) for name in list(named) if name not in _MODEL_PARAMETERS}
        plan = plan_for_call(self.encoder, extra)  # a tome_plan= keyword goes to the encoder only
        encoder_outputs = named.get("encoder_outputs")
        if encoder_outputs is None:
            features = self._mask_input_features(named.get("input_features"),
                                                 attention_mask=named.get("attention_mask"))
            # A cache under an older name (``past_key_values``) is the decoder's: the stock forward's deprecation
            # wrapper renames it on the way there, and the encoder takes none.
            encoder_kwargs = {name: value for name, value in extra.items() if name not in CACHE_ARGUMENTS}
            encoder_outputs = named["encoder_outputs"] = self.encoder(features, tome_plan=plan, **encoder_kwargs)
        sizes = getattr(encoder_outputs, "token_sizes", None)  # a plain tuple carries none: nothing merged
        bias = cross_attention_bias(encoder_outputs, plan)
        if bias is not None:
            extra["encoder_attention_bias"] = bias
        output = super().forward(**named, **extra)
        if isinstance(output, Seq2SeqModelOutput):
            return WhisperMergeModelOutput(**output, encoder_token_sizes=sizes)
        return output


_MODEL_PARAMETERS = named_parameters(whisper.WhisperModel.forward)


class ToMeWhisperForConditionalGeneration(ToMeModelMixin, whisper.WhisperForConditionalGeneration):
    """``WhisperForConditionalGeneration`` with a merged encoder; ``generate()`` works as usual."""

    def generate(self, *args, **kwargs):
        """Stock Whisper ``generate``; word-level timestamps are refused while frames are merged.

        Token timestamps align cross-attention columns with 20 ms frames, which merged tokens no longer are.
        """
        plan = kwargs.get("tome_plan") or getattr(self.model.encoder, "_tome_plan", None)
        if kwargs.get("return_token_timestamps") and plan is not None and any(plan.layer_r):
            raise ValueError("hf_tome: return_token_timestamps needs one encoder token per frame; expected r=0 "
                             "(or hf_tome.remove(model)) when asking for token timestamps")
        return super().generate(*args, **kwargs)


def _encoder_shape(model: nn.Module, input_size: tuple[int, int] | None) -> EncoderShape:
    """Encoder sizes; ``input_size`` is ``(num_mel_bins, frames)`` and must be the one Whisper accepts.

    Counted: the conv front end as the embedding term, per encoder token (conv1, kernel 3, stride 1, runs on two
    input frames per token: ``2*3*mel*C``; conv2, kernel 3, stride 2: ``3*C*C``), and every encoder block by the
    ViT formula with ``encoder_ffn_dim`` as the MLP width. Not counted: GELUs, layer norms, position adds and the
    whole decoder (its cost depends on the transcript length and merging changes only its cross-attention).
    """
    config = model.config
    tokens = config.max_source_positions
    frames = 2 * tokens  # conv2 has stride 2; the encoder refuses any other input length
    if input_size is not None and tuple(input_size) != (config.num_mel_bins, frames):
        raise ValueError(f"Whisper's encoder takes (num_mel_bins, frames) = ({config.num_mel_bins}, {frames}); "
                         f"got {tuple(input_size)}")
    channels = config.d_model
    return EncoderShape(
        hidden_size=channels,
        intermediate_size=config.encoder_ffn_dim,
        num_layers=config.encoder_layers,
        num_patches=tokens,
        protected=0,
        patch_macs_per_patch=2 * 3 * config.num_mel_bins * channels + 3 * channels * channels,
        head_macs=0,
    )


def _loop_module(model: nn.Module) -> nn.Module:
    if isinstance(model, whisper.WhisperEncoder):
        return model
    if isinstance(model, whisper.WhisperModel):
        return model.encoder
    return model.model.encoder


register_adapter(Adapter(
    family="whisper",
    class_map={
        whisper.WhisperAttention: ToMeWhisperAttention,
        whisper.WhisperEncoderLayer: ToMeWhisperEncoderLayer,
        whisper.WhisperDecoderLayer: ToMeWhisperDecoderLayer,
        whisper.WhisperEncoder: ToMeWhisperEncoder,
        whisper.WhisperModel: ToMeWhisperModel,
        whisper.WhisperForConditionalGeneration: ToMeWhisperForConditionalGeneration,
    },
    supported=(whisper.WhisperModel, whisper.WhisperForConditionalGeneration, whisper.WhisperEncoder),
    protected_tokens=lambda config: 0,
    loop_module=_loop_module,
    encoder_shape=_encoder_shape,
))
