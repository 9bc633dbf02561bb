"""Block compression (DC-ViT): blocks without attention and with a slimmer MLP, described in the config.

A compressed block keeps its residual structure but loses the attention branch, and its MLP keeps only some
hidden units: ``x = x + mlp'(norm2(x))``. A block with no hidden units left is dropped (the identity). The
architecture is stored as ``config.block_compression`` (``{"mlp_kept": {"<layer>": units}, ...}``), so
``hf_tome.AutoModel*.from_pretrained`` rebuilds the slim modules before the weights are loaded.

This module knows the layer layouts of the ViT, DeiT and Dinov2 families and nothing of training. ``hf_tome.dcvit.hook``
registers it with the loader as a structure hook, so the ToMe core rebuilds, plans and counts compressed blocks
without importing DC-ViT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.models.deit import modeling_deit as deit
from transformers.models.dinov2 import modeling_dinov2 as dinov2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as dinov2_reg
from transformers.models.vit import modeling_vit as vit

from hf_tome.integration.encoder import encoder_layers as find_encoder_layers

CONFIG_KEY = "block_compression"

# Layer class -> name of the pre-attention norm (replaced too: it only feeds the removed attention).
_ATTENTION_NORM = {vit.ViTLayer: "layernorm_before", deit.DeiTLayer: "layernorm_before", dinov2.Dinov2Layer: "norm1",
                   dinov2_reg.Dinov2WithRegistersLayer: "norm1"}
SUPPORTED_BLOCK_FAMILIES = "ViT, DeiT and Dinov2 (Dinov2 with registers too)"
# Layer class -> name of the per-channel scale applied to the MLP's output (absent: none).
_MLP_OUTPUT_SCALE = {dinov2.Dinov2Layer: "layer_scale2", dinov2_reg.Dinov2WithRegistersLayer: "layer_scale2"}


class RemovedAttention(nn.Module):
    """Stands in for a removed attention branch: adds nothing to the residual stream, has no weights.

    Answers both call conventions: the stock layers' ``(output, weights)`` and hf_tome's patched layers'
    ``(output, weights, keys[, class attention])``; with no keys the patched layer merges nothing here.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, need_keys: bool | None = None,
                need_class_attention: bool = False, **kwargs: Any) -> tuple[torch.Tensor | None, ...]:
        zeros = torch.zeros_like(hidden_states)
        if need_keys is None:
            return zeros, None
        return (zeros, None, None, None) if need_class_attention else (zeros, None, None)


class RemovedMLP(nn.Module):
    """The MLP of a dropped block (no hidden units kept): contributes zero."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a ViT, DeiT or Dinov2 model (base model or with a head), found by
    :func:`hf_tome.integration.encoder.encoder_layers` (by attribute, so subclasses that ``from_pretrained`` builds
    work too); ``ValueError`` for any other family."""
    try:
        layers = find_encoder_layers(model)
    except ValueError:
        layers = None
    if not layers or _attention_norm_name(layers[0]) is None:
        raise ValueError(f"block compression does not support {type(model).__name__}: expected a model of the "
                         f"{SUPPORTED_BLOCK_FAMILIES} families")
    return layers


def _attention_norm_name(layer: nn.Module) -> str | None:
    for layer_class, name in _ATTENTION_NORM.items():
        if isinstance(layer, layer_class):  # hf_tome's patched layers are subclasses
            return name
    return None


def mlp_width(layer: nn.Module) -> int:
    """Hidden units of a block's MLP now (0 for a dropped block)."""
    return 0 if isinstance(layer.mlp, RemovedMLP) else layer.mlp.fc1.out_features


def mlp_output_scale(layer: nn.Module) -> torch.Tensor | None:
    """The per-channel factor a block applies to its MLP's output (Dinov2's layer scale), None when there is none."""
    for layer_class, name in _MLP_OUTPUT_SCALE.items():
        if isinstance(layer, layer_class):
            return getattr(layer, name).lambda1.detach()
    return None


def has_attention(layer: nn.Module) -> bool:
    """False once the block's attention branch has been removed."""
    return not isinstance(layer.attention, RemovedAttention)


def unit_importance(layer: nn.Module, activations_abs_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each MLP hidden unit: mean |activation| (or 1) times the norm of its output weights."""
    out_norm = layer.mlp.fc2.weight.detach().float().norm(dim=0)
    return out_norm if activations_abs_mean is None else out_norm * activations_abs_mean.float()


def compress_layer(layer: nn.Module, kept_units: int, importance: torch.Tensor | None = None) -> None:
    """Remove ``layer``'s attention and keep ``kept_units`` MLP units (the most important, else the first).

    ``kept_units`` 0 drops the block. The kept units keep their trained weights, so the compressed block starts
    as the original MLP restricted to those units.
    """
    width = mlp_width(layer)
    if not 0 <= kept_units <= width:
        raise ValueError(f"kept_units={kept_units} is invalid for a block with {width} MLP units: expected 0..{width}")
    norm_name = _attention_norm_name(layer)
    layer.attention = RemovedAttention()
    setattr(layer, norm_name, nn.Identity())
    if kept_units == 0:
        layer.mlp = RemovedMLP()
        return
    if kept_units == width:
        return
    scores = importance if importance is not None else torch.arange(width, 0, -1, dtype=torch.float)
    kept = scores.topk(kept_units).indices.sort().values.to(layer.mlp.fc1.weight.device)
    layer.mlp.fc1 = _slice_linear(layer.mlp.fc1, rows=kept)
    layer.mlp.fc2 = _slice_linear(layer.mlp.fc2, columns=kept)


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                  columns: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    sliced = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    if weight.device.type != "meta":
        with torch.no_grad():
            sliced.weight.copy_(weight)
            if linear.bias is not None:
                sliced.bias.copy_(linear.bias if rows is None else linear.bias[rows])
    return sliced


def compression_of(model: nn.Module) -> dict[int, int]:
    """``{layer index: kept MLP units}`` for every compressed block of ``model`` (empty when none).

    The modules are the truth; only models whose config says they were compressed are inspected, so this is free
    (and safe) for every other family.
    """
    return _compressed_modules(model) if getattr(model.config, CONFIG_KEY, None) else {}


def _compressed_modules(model: nn.Module) -> dict[int, int]:
    return {index: mlp_width(layer) for index, layer in enumerate(encoder_layers(model)) if not has_attention(layer)}


def record_compression(model: nn.Module, **details: Any) -> dict[str, Any]:
    """Write the model's current block compression (and ``details`` such as method, budget) into its config."""
    previous = dict(getattr(model.config, CONFIG_KEY, None) or {})
    previous.update(details)
    previous["mlp_kept"] = {str(index): units for index, units in sorted(_compressed_modules(model).items())}
    setattr(model.config, CONFIG_KEY, previous)
    return previous


def compressed_layers_from_config(config: Any) -> dict[int, int]:
    """``{layer index: kept units}`` described by ``config.block_compression`` (empty when absent)."""
    section = getattr(config, CONFIG_KEY, None) or {}
    mlp_kept = section.get("mlp_kept", {})
    if not isinstance(mlp_kept, dict):
        raise ValueError(f"config.{CONFIG_KEY}['mlp_kept']={mlp_kept!r} is invalid: expected a dict "
                         "{layer index: kept MLP units}")
    return {int(index): int(units) for index, units in mlp_kept.items()}


def rebuild_from_config(model: nn.Module) -> nn.Module:
    """Give a freshly built model the compressed blocks its config describes (before weights are loaded)."""
    layers = encoder_layers(model)
    for index, units in compressed_layers_from_config(model.config).items():
        if not 0 <= index < len(layers):
            raise ValueError(f"config.{CONFIG_KEY} names layer {index}: expected 0..{len(layers) - 1}")
        compress_layer(layers[index], units)
    return model


def split_units(total_units: int, blocks: Sequence[int]) -> dict[int, int]:
    """Share ``total_units`` kept MLP units between ``blocks`` as evenly as possible (widths differ by <= 1)."""
    base, extra = divmod(total_units, len(blocks))
    return {block: base + (1 if position < extra else 0) for position, block in enumerate(blocks)}

