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

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.whisper import modeling_whisper as whisper
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ..mixin import ToMeModelMixin
from .common import ReductionPlan, proportional_attention_mask, reduce_tokens, run_layers
from .registry import Adapter, EncoderShape, register_adapter


@dataclass
class WhisperEncoderMergeOutput(BaseModelOutput):
    """``BaseModelOutput`` of the Whisper encoder plus what the decoder needs to read merged frames.

    A ``BaseModelOutput`` subclass, so Whisper's generation code (which checks for that type) passes it on intact.
    token_sizes: [B, N, 1] how many encoder frames each output token stands for (None when nothing merged).
    token_positions: [B, N_orig] index of the output token holding each original frame.
    token_source: [B, N, N_orig] 0/1 membership matrix, when ``trace_source`` is on.
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

    Without ``need_keys`` it is the stock forward (decoder self- and cross-attention use it unchanged).
    """

    def forward(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                past_key_values=None, attention_mask: torch.Tensor | None = None, output_attentions: bool = False,
                need_keys: bool = False, **kwargs):
        if not need_keys:
            return super().forward(hidden_states, key_value_states, past_key_values, attention_mask,
                                   output_attentions, **kwargs)
        if key_value_states is not None or past_key_values is not None:
            raise ValueError("hf_tome: need_keys is only supported for encoder self-attention (no cache, no cross)")
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
            scaling=1.0, output_attentions=output_attentions, **kwargs,
        )
        attn_output = self.out_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights, key.mean(dim=1)


class ToMeWhisperEncoderLayer(whisper.WhisperEncoderLayer):
    """Whisper encoder layer with a token reduction between the self-attention and the MLP."""

    def forward(self, hidden_states, attention_mask=None, size=None, positions=None, source=None, *,
                tome_r: int = 0, protected: int = 0, prop_attn: bool = True, trace_source: bool = False, **kwargs):
        residual = hidden_states
        mask = proportional_attention_mask(attention_mask, size, prop_attn, hidden_states.dtype)
        outputs = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask=mask,
                                 need_keys=tome_r > 0, **kwargs)
        metric = outputs[2] if tome_r > 0 else None
        hidden_states = residual + nn.functional.dropout(outputs[0], p=self.dropout, training=self.training)
        hidden_states, size, positions, source = reduce_tokens(
            hidden_states, metric, size, positions, source, tome_r, protected, trace_source
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
    the decoder arrives here without replacing the decoder's own forward.
    """

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_values=None, use_cache=True, encoder_attention_bias: torch.Tensor | None = None, **kwargs):
        if encoder_attention_bias is not None:
            encoder_attention_mask = (encoder_attention_bias if encoder_attention_mask is None
                                      else encoder_attention_mask + encoder_attention_bias)
        return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                               past_key_values, use_cache, **kwargs)


class ToMeWhisperEncoder(ToMeModelMixin, whisper.WhisperEncoder):
    """``WhisperEncoder`` running hf_tome's encoder loop; returns a :class:`WhisperEncoderMergeOutput`."""

    _tome_plan: ReductionPlan

    # Same decorators as the stock forward, so hidden states and attentions are recorded per layer as usual.
    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_features: torch.Tensor, attention_mask=None, **kwargs) -> WhisperEncoderMergeOutput:
        expected_frames = self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if input_features.shape[-1] != expected_frames:
            raise ValueError(f"Whisper expects the mel input features to be of length {expected_frames}, but found "
                             f"{input_features.shape[-1]}; pad the input mel features to {expected_frames}")
        embeds = nn.functional.gelu(self.conv1(input_features))
        embeds = nn.functional.gelu(self.conv2(embeds)).permute(0, 2, 1)
        all_positions = torch.arange(self.embed_positions.num_embeddings, device=embeds.device)
        hidden_states = embeds + self.embed_positions(all_positions)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        layers, plan = list(self.layers), self._tome_plan
        if self.training and self.layerdrop > 0.0:
            # LayerDrop skips whole layers; their share of the schedule is skipped with them.
            kept = [i for i in range(len(layers)) if not torch.rand([]) < self.layerdrop]
            layers = [layers[i] for i in kept]
            plan = dataclasses.replace(plan, layer_r=[plan.layer_r[i] for i in kept])
        # Whisper never masks encoder frames (its attention_mask argument is ignored by the stock encoder too).
        hidden, size, positions, source = run_layers(layers, hidden_states, plan, None, **kwargs)
        return WhisperEncoderMergeOutput(last_hidden_state=self.layer_norm(hidden), token_sizes=size,
                                         token_positions=positions, token_source=source)


def cross_attention_bias(encoder_outputs, plan: ReductionPlan | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The decoder's additive cross-attention mask ``log(size)`` [B, 1, 1, N_enc], or None when nothing merged."""
    sizes = getattr(encoder_outputs, "token_sizes", None)
    prop_attn = plan.prop_attn if plan is not None else True
    return proportional_attention_mask(None, sizes, prop_attn, dtype)


class ToMeWhisperModel(ToMeModelMixin, whisper.WhisperModel):
    """``WhisperModel`` whose decoder cross-attends to merged encoder tokens with proportional attention."""

    @can_return_tuple
    def forward(self, input_features: torch.Tensor | None = None, attention_mask: torch.LongTensor | None = None,
                decoder_input_ids: torch.LongTensor | None = None,
                decoder_attention_mask: torch.LongTensor | None = None, encoder_outputs=None, past_key_values=None,
                decoder_inputs_embeds: torch.Tensor | None = None,
                decoder_position_ids: torch.LongTensor | None = None, use_cache: bool | None = None,
                **kwargs) -> WhisperMergeModelOutput:
        if encoder_outputs is None:
            input_features = self._mask_input_features(input_features, attention_mask=attention_mask)
            encoder_outputs = self.encoder(input_features, **kwargs)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            # A plain tuple carries no sizes: the decoder then attends to its tokens as if none were merged.
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        encoder_hidden = encoder_outputs.last_hidden_state
        bias = cross_attention_bias(encoder_outputs, getattr(self.encoder, "_tome_plan", None), encoder_hidden.dtype)
        if bias is not None:
            kwargs["encoder_attention_bias"] = bias
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids, attention_mask=decoder_attention_mask, encoder_hidden_states=encoder_hidden,
            past_key_values=past_key_values, inputs_embeds=decoder_inputs_embeds, position_ids=decoder_position_ids,
            use_cache=use_cache, **kwargs,
        )
        return WhisperMergeModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            past_key_values=decoder_outputs.past_key_values,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_hidden,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            encoder_token_sizes=getattr(encoder_outputs, "token_sizes", None),
        )


class ToMeWhisperForConditionalGeneration(ToMeModelMixin, whisper.WhisperForConditionalGeneration):
    """``WhisperForConditionalGeneration`` with a merged encoder; ``generate()`` works as usual."""

    def generate(self, *args, **kwargs):
        """Stock Whisper ``generate``; word-level timestamps are refused while frames are merged.

        Token timestamps align cross-attention columns with 20 ms frames, which merged tokens no longer are.
        """
        plan = getattr(self.model.encoder, "_tome_plan", None)
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
