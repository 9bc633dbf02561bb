"""Swin adapter: token merging inside every attention window, unmerged before the grid is rebuilt.

In each Swin layer with a per-window ``r > 0``:

1. after the cyclic shift and window partition, every window (a batch entry of the matching, nothing protected)
   merges ``r`` of its ``ws * ws`` tokens by bipartite soft matching. The metric is the normalised layer input of
   the window (``layernorm_before``), which is free: the keys ToMe uses would need a projection of every token
   before merging. Tokens of different shift regions (and padding) never merge, because the shift mask keeps
   them apart in attention and one merged token cannot stand on both sides of that wall;
2. window attention runs on the merged tokens. With the default rule (``extra["swin_bias"] = "logsumexp"``)
   the additive bias of merged query ``I`` and key ``J`` is ``logsumexp_{b in J} mean_{a in I} B[a, b]``, ``B``
   being Swin's relative position bias. Why: the merged query is the mean of its members, so (projections being
   linear) its logit row ``q_I.k_b`` is the mean of their rows, and the mean bias row keeps its whole logit row
   the members' mean exactly; on the key side, softmax over the copies of a group of identical keys sums
   ``exp(q.k_J + bias[b])``, one logit with the group's logsumexp. A constant bias gives ``B + log |J|``: ToMe's
   proportional attention is the special case, so no separate ``log(size)`` is added (``prop_attn=False``
   subtracts it again). Singleton groups get exactly Swin's bias. ``"representative"`` instead reads ``B`` at
   one member of each group (the unmerged A token, or the B token that absorbed others) and adds ``log |J|``:
   one gather instead of two scatters over the window's bias, but blind to where the other members sit.
   The shift mask is exact on merged tokens since a group never spans two regions; it is read at the members;
3. the attention output is unmerged (every member takes its group's value) back to the full window before
   window reverse, un-shift and patch merging, so the spatial grid and the residual stream stay per token;
4. optionally (``ToMeConfig.extra["swin_merge_mlp"]``) the MLP also runs on the merged tokens of the same
   matching, on the size-weighted mean of the post-attention residual stream, and its output is unmerged.

Settings: ``ToMeConfig.r`` (int with ``inflect``, or a per-layer list over all ``sum(depths)`` layers) or
``extra["swin_stage_r"] = [r1, r2, ...]`` (one per-window r per stage), clamped to half the window tokens;
``extra["swin_merge_mlp"]`` (bool) and ``extra["swin_bias"]`` ("logsumexp" or "representative").
"""

# Over 300 lines on purpose: one model family is one adapter module (README, "Architecture"; adapters are found by
# listing the folder). Swin needs more than the ViT-style families: patched attention, layer, stage, encoder and
# models, a plan per stage's windows and its own MACs report; the family-free window maths is in core/windows.py.

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.swin import modeling_swin as swin
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from hf_tome.config import ToMeConfig
from hf_tome.core.macs import ComputeReport, EncoderShape
from hf_tome.core.ops import unmerge
from hf_tome.core.plan import ReductionPlan
from hf_tome.core.schedule import clamp_r, merge_schedule
from hf_tome.core.windows import group_members, match_windows, merged_window_bias
from hf_tome.integration.encoder import plan_for_call
from hf_tome.integration.mixin import ToMeModelMixin
from hf_tome.integration.registry import Adapter, register_adapter

STAGE_R_KEY = "swin_stage_r"
MERGE_MLP_KEY = "swin_merge_mlp"
BIAS_KEY = "swin_bias"
BIAS_RULES = ("logsumexp", "representative")
_EXTRA_KEYS = (STAGE_R_KEY, MERGE_MLP_KEY, BIAS_KEY)


@dataclass(frozen=True)
class SwinReductionPlan(ReductionPlan):
    """Per-window r of every Swin layer (flattened over stages), whether the MLP runs merged too, the bias rule."""

    merge_mlp: bool = False
    bias_rule: str = "logsumexp"
    depths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "depths", tuple(self.depths))

    def stage_r(self) -> list[list[int]]:
        """``layer_r`` split by stage."""
        starts = [sum(self.depths[:i]) for i in range(len(self.depths))]
        return [self.layer_r[start:start + depth] for start, depth in zip(starts, self.depths, strict=True)]


# Matching and the merged attention bias (tensor code, per window).

def window_labels(layer: swin.SwinLayer, height: int, width: int, height_pad: int, width_pad: int,
                  device: torch.device) -> torch.Tensor | None:
    """Label [num_windows, ws * ws] of every window position: tokens with different labels must not merge.

    The label combines the cyclic-shift region (as Swin's shift mask defines it, in the shifted frame) and
    whether the position is padding. None when a layer has neither shift nor padding.
    """
    if layer.shift_size <= 0 and height_pad == height and width_pad == width:
        return None
    rows, cols = torch.arange(height_pad, device=device), torch.arange(width_pad, device=device)
    is_pad = ((rows >= height)[:, None] | (cols >= width)[None, :]).long()
    labels = layer.cyclic_shift(is_pad[None, :, :, None])  # padding moves with the shift
    if layer.shift_size > 0:
        ws, shift = layer.window_size, layer.shift_size
        row_region = (rows >= height_pad - ws).long() + (rows >= height_pad - shift).long()
        col_region = (cols >= width_pad - ws).long() + (cols >= width_pad - shift).long()
        labels = labels + 2 * (row_region[:, None] * 3 + col_region[None, :])[None, :, :, None]
    return swin.window_partition(labels, layer.window_size).reshape(-1, layer.window_size**2)


# Patched modules.

class ToMeSwinAttention(swin.SwinAttention):
    """Window attention that can take a ready-made additive bias (for merged tokens) instead of its own."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                merged_bias: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if merged_bias is None:
            return super().forward(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          swin.eager_attention_forward)
        attn_output, attn_weights = attention(
            self, query, key, value, merged_bias.to(query.dtype),
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


class ToMeSwinLayer(swin.SwinLayer):
    """Swin layer merging ``tome_r`` tokens per window for attention (and optionally the MLP)."""

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], always_partition: bool = False,
                *, tome_r: int = 0, tome_plan: SwinReductionPlan | None = None, **kwargs: Unpack[TransformersKwargs]):
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        ws = self.window_size
        r = clamp_r(tome_r, ws * ws, 0)
        if r == 0 or tome_plan is None:  # the stock forward, bit for bit
            return super().forward(hidden_states=hidden_states, input_dimensions=input_dimensions,
                                   always_partition=always_partition, **kwargs)
        height, width = input_dimensions
        batch = hidden_states.shape[0]
        shortcut = hidden_states
        windows, (height_pad, width_pad) = self._to_windows(self.layernorm_before(hidden_states), height, width)
        device = windows.device
        labels = window_labels(self, height, width, height_pad, width_pad, device)
        shift_mask = self.get_attn_mask(height_pad, width_pad, dtype=windows.dtype, device=device)
        if labels is not None:
            labels = labels.expand(batch, -1, -1).reshape(-1, ws * ws)

        matching = match_windows(windows, r, labels)
        positions = matching.new_positions(ws * ws)  # window position -> merged token holding it
        # Every token enters a Swin layer with size 1, so the size-weighted mean is a plain sum / count. Sizes
        # are float32 in every model dtype and the sum is taken in float32, cast back to the model dtype once.
        size = matching.merge(torch.ones(windows.shape[0], ws * ws, 1, dtype=torch.float32, device=device))
        merged = (matching.merge(windows.float()) / size).to(windows.dtype)
        # The bias is merged in float32: its exp/log round-trip is too coarse in half precision.
        bias = merged_window_bias(positions, group_members(matching, ws * ws),
                                  self.attention.relative_position_bias()[0].float(), size, shift_mask,
                                  tome_plan.prop_attn, tome_plan.bias_rule)
        attention_output, attn_weights = self.attention(merged, merged_bias=bias, **kwargs)
        attention_output = self._from_windows(unmerge(self.dropout(attention_output), positions), batch, height,
                                              width, height_pad, width_pad)
        hidden_states = shortcut + self.drop_path(attention_output)

        if tome_plan.merge_mlp:
            # Same groups as attention; each group's MLP input is the mean of its members' residual stream.
            stream, _ = self._to_windows(hidden_states, height, width)
            merged_stream = (matching.merge(stream.float()) / size).to(stream.dtype)
            mlp_output = unmerge(self.mlp(self.layernorm_after(merged_stream)), positions)
            mlp_output = self._from_windows(mlp_output, batch, height, width, height_pad, width_pad)
        else:
            mlp_output = self.mlp(self.layernorm_after(hidden_states))
        return self.dropout(mlp_output) + hidden_states, attn_weights

    def _to_windows(self, tokens: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, H*W, C] -> padded, shifted windows [B*nW, ws*ws, C], as the stock forward partitions."""
        batch, _, channels = tokens.shape
        grid, _ = self.maybe_pad(tokens.view(batch, height, width, channels), height, width)
        windows = swin.window_partition(self.cyclic_shift(grid), self.window_size)
        return windows.view(-1, self.window_size**2, channels), (grid.shape[1], grid.shape[2])

    def _from_windows(self, windows: torch.Tensor, batch: int, height: int, width: int, height_pad: int,
                      width_pad: int) -> torch.Tensor:
        """Inverse of :meth:`_to_windows`: window reverse, un-shift, crop the padding; returns [B, H*W, C]."""
        channels = windows.shape[-1]
        windows = windows.view(-1, self.window_size, self.window_size, channels)
        grid = self.cyclic_shift(swin.window_reverse(windows, self.window_size, height_pad, width_pad), reverse=True)
        if height_pad > height or width_pad > width:
            grid = grid[:, :height, :width, :].contiguous()
        return grid.view(batch, height * width, channels)


class ToMeSwinStage(swin.SwinStage):
    """Swin stage passing each block its per-window r."""

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], always_partition: bool = False,
                output_hidden_states_before_downsampling: bool = False, *, tome_layer_r: tuple[int, ...] = (),
                tome_plan: SwinReductionPlan | None = None, **kwargs: Unpack[TransformersKwargs]):
        height, width = input_dimensions
        layer_r = list(tome_layer_r) + [0] * (len(self.blocks) - len(tome_layer_r))
        last_attn_weights = None
        for block, r in zip(self.blocks, layer_r, strict=True):
            hidden_states, last_attn_weights = block(hidden_states, input_dimensions, always_partition=always_partition,
                                                     tome_r=r, tome_plan=tome_plan, **kwargs)
        before_downsampling = hidden_states
        if self.downsample is not None:
            hidden_states = self.downsample(input_feature=before_downsampling, input_dimensions=input_dimensions)
        reshaped = self.get_reshaped_hidden_states(hidden_states, before_downsampling, height, width,
                                                   output_hidden_states_before_downsampling)
        return hidden_states, reshaped, last_attn_weights


class ToMeSwinEncoder(swin.SwinEncoder):
    """Swin encoder reading the reduction plan (the loop module of this family)."""

    _tome_plan: SwinReductionPlan

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], always_partition: bool = False,
                output_hidden_states: bool = False, output_hidden_states_before_downsampling: bool = False,
                **kwargs: Unpack[TransformersKwargs]) -> swin.SwinEncoderOutput:
        all_reshaped = None
        if output_hidden_states:
            batch, _, channels = hidden_states.shape
            all_reshaped = (hidden_states.view(batch, *input_dimensions, channels).permute(0, 3, 1, 2).contiguous(),)
        plan = plan_for_call(self, kwargs, SwinReductionPlan)
        for stage, stage_r in zip(self.layers, plan.stage_r(), strict=True):
            hidden_states, reshaped, _ = stage(
                hidden_states, input_dimensions, always_partition=always_partition,
                output_hidden_states_before_downsampling=output_hidden_states_before_downsampling,
                tome_layer_r=tuple(stage_r), tome_plan=plan, **kwargs,
            )
            if output_hidden_states:
                all_reshaped += (reshaped,)
            if stage.downsample is not None:
                input_dimensions = ((input_dimensions[0] + 1) // 2, (input_dimensions[1] + 1) // 2)
        return swin.SwinEncoderOutput(last_hidden_state=hidden_states, reshaped_hidden_states=all_reshaped)


class ToMeSwinModel(ToMeModelMixin, swin.SwinModel):
    pass


class ToMeSwinForImageClassification(ToMeModelMixin, swin.SwinForImageClassification):
    pass


# Plan and MACs.

def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _stage_windows(config, image_size: tuple[int, int] | None) -> list[tuple[tuple[int, int], int]]:
    """For every stage: its (height, width) patch grid and its effective window size."""
    height, width = image_size or _pair(config.image_size)
    patch_h, patch_w = _pair(config.patch_size)
    grid = (math.ceil(height / patch_h), math.ceil(width / patch_w))
    stages = []
    for _ in config.depths:
        # Swin shrinks the window (and drops the shift) when a stage's grid is not larger than it.
        stages.append((grid, min(grid) if min(grid) <= config.window_size else config.window_size))
        grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
    return stages


def build_swin_plan(model: nn.Module, config: ToMeConfig) -> SwinReductionPlan:
    """The Swin plan of ``config``: per-window r per layer, clamped to half of each stage's window tokens."""
    swin_config = model.config
    depths = list(swin_config.depths)
    extra = config.extra  # its keys were checked against Adapter.extra_keys by hf_tome.integration.patch.build_plan
    if config.trace_source or config.prune_kept is not None:
        raise ValueError("Swin supports per-window merging only: expected trace_source=False and prune_kept=None "
                         "(every Swin layer unmerges, so no token sources or pruned tokens exist)")
    merge_mlp = extra.get(MERGE_MLP_KEY, False)
    if not isinstance(merge_mlp, bool):
        raise ValueError(f"ToMeConfig.extra[{MERGE_MLP_KEY!r}]={merge_mlp!r} is invalid: expected True or False")
    bias_rule = extra.get(BIAS_KEY, "logsumexp")
    if bias_rule not in BIAS_RULES:
        raise ValueError(f"ToMeConfig.extra[{BIAS_KEY!r}]={bias_rule!r} is invalid: expected one of {BIAS_RULES}")
    stage_r = extra.get(STAGE_R_KEY)
    if stage_r is not None:
        if (not isinstance(stage_r, list | tuple) or len(stage_r) != len(depths)
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in stage_r)):
            raise ValueError(f"ToMeConfig.extra[{STAGE_R_KEY!r}]={stage_r!r} is invalid: expected a list of "
                             f"{len(depths)} ints >= 0 (tokens merged per window in each stage)")
        if config.uses_merging_schedule:
            raise ValueError(f"ToMeConfig.r={config.r!r} is invalid with extra[{STAGE_R_KEY!r}]: expected r=0 "
                             "(give the per-window r either way, not both)")
        layer_r = [r for r, depth in zip(stage_r, depths, strict=True) for _ in range(depth)]
    else:
        layer_r = merge_schedule(config.r, sum(depths), config.inflect)
    window_tokens = [window**2 for _, window in _stage_windows(swin_config, None)]
    per_layer_tokens = [tokens for tokens, depth in zip(window_tokens, depths, strict=True) for _ in range(depth)]
    layer_r = [clamp_r(r, tokens, 0) for r, tokens in zip(layer_r, per_layer_tokens, strict=True)]
    return SwinReductionPlan(layer_r=layer_r, protected=0, prop_attn=config.prop_attn, merge_mlp=merge_mlp,
                             bias_rule=bias_rule, depths=depths)


@dataclass
class SwinComputeReport(ComputeReport):
    """``ComputeReport`` for Swin, per image. Per layer, ``tokens_in`` counts the tokens attention runs on (all
    windows, after merging) and ``tokens_out`` those the MLP runs on; ``layer_macs`` includes the matching's
    similarity matmul; ``downsample_macs`` holds each stage's patch merging (0 for the last stage)."""

    downsample_macs: list[int] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        return super().total_macs + sum(self.downsample_macs)


def swin_compute_report(model: nn.Module, image_size: tuple[int, int] | None = None,
                        plan: SwinReductionPlan | None = None) -> SwinComputeReport:
    """MACs per image of a (patched or stock) Swin model at ``image_size`` (height, width), default the config's.

    Window attention with N tokens per window (after merging), C channels: ``4*N*C^2 + 2*N^2*C`` per window over
    all (padded) windows; MLP ``2*T*C*I`` over the T tokens it runs on; matching ``ceil(N0/2)*floor(N0/2)*C`` per
    window of N0 tokens when r > 0; patch merging ``(H/2)*(W/2)*4C*2C``; embedding and classifier as in ViT.
    """
    config = model.config
    stages = _stage_windows(config, image_size)
    layer_r = plan.layer_r if plan is not None else [0] * sum(config.depths)
    merge_mlp = plan.merge_mlp if plan is not None else False
    patch_h, patch_w = _pair(config.patch_size)
    (grid_h, grid_w), _ = stages[0]
    embedding = grid_h * grid_w * config.embed_dim * config.num_channels * patch_h * patch_w
    tokens_in, tokens_out, layer_macs, downsample = [], [], [], []
    layer = 0
    for stage, ((grid_h, grid_w), window) in enumerate(stages):
        channels = int(config.embed_dim * 2**stage)
        hidden = int(config.mlp_ratio * channels)
        num_windows = math.ceil(grid_h / window) * math.ceil(grid_w / window)
        full = window * window
        for _ in range(config.depths[stage]):
            r = clamp_r(layer_r[layer], full, 0)
            kept = full - r
            attention = num_windows * (4 * kept * channels**2 + 2 * kept**2 * channels)
            matching = num_windows * ((full + 1) // 2) * (full // 2) * channels if r > 0 else 0
            mlp_tokens = num_windows * kept if merge_mlp and r > 0 else grid_h * grid_w
            tokens_in.append(num_windows * kept)
            tokens_out.append(mlp_tokens)
            layer_macs.append(attention + matching + 2 * mlp_tokens * channels * hidden)
            layer += 1
        last = stage == len(stages) - 1
        downsample.append(0 if last else ((grid_h + 1) // 2) * ((grid_w + 1) // 2) * 4 * channels * 2 * channels)
    classifier = getattr(model, "classifier", None)
    head = classifier.in_features * classifier.out_features if isinstance(classifier, nn.Linear) else 0
    return SwinComputeReport(tokens_in, tokens_out, layer_macs, embedding, head, downsample_macs=downsample)


def _encoder_shape(model: nn.Module, image_size: tuple[int, int] | None) -> EncoderShape:
    raise NotImplementedError("Swin has no single-encoder shape: use hf_tome.compute_report (it calls the Swin "
                              "formula of hf_tome.adapters.swin)")


def _loop_module(model: nn.Module) -> nn.Module:
    return model.encoder if isinstance(model, swin.SwinModel) else model.swin.encoder


register_adapter(Adapter(
    family="swin",
    class_map={
        swin.SwinAttention: ToMeSwinAttention,
        swin.SwinLayer: ToMeSwinLayer,
        swin.SwinStage: ToMeSwinStage,
        swin.SwinEncoder: ToMeSwinEncoder,
        swin.SwinModel: ToMeSwinModel,
        swin.SwinForImageClassification: ToMeSwinForImageClassification,
    },
    supported=(swin.SwinModel, swin.SwinForImageClassification),
    protected_tokens=lambda config: 0,
    loop_module=_loop_module,
    encoder_shape=_encoder_shape,
    plan_builder=build_swin_plan,
    compute_report=swin_compute_report,
    extra_keys=_EXTRA_KEYS,
))
