"""MACs accounting for ViT-style encoders, per layer, with and without token reduction.

One block with C channels, MLP width I, N tokens entering and N' after its reduction costs
``4*N*C^2 + 2*N^2*C`` (attention at N) plus ``2*N'*C*I`` (MLP at N'; ``8*N'*C^2`` for the usual I = 4C).
Patch embedding adds ``N_patches * C * channels * p^2`` and the classifier ``C * num_classes``.
"""

from __future__ import annotations

from torch import nn

from hf_tome.core.macs import ComputeReport, block_macs, encoder_report
from hf_tome.core.schedule import kept_tokens_per_layer, tokens_per_layer
from hf_tome.integration.registry import find_adapter, slim_layers, unwrap_compiled

__all__ = ["ComputeReport", "block_macs", "compute_report", "encoder_report"]


def compute_report(model: nn.Module, image_size: tuple[int, int] | None = None) -> ComputeReport:
    """Tokens entering each layer and the MACs per image of ``model`` as currently configured.

    Works on patched and unpatched models (unpatched: no reduction), compiled ones too (``torch.compile``).
    ``image_size`` (height, width) defaults to the config's.
    """
    model = unwrap_compiled(model)
    adapter = find_adapter(model)
    if adapter.compute_report is not None:  # e.g. windowed attention, which the formula above does not describe
        return adapter.compute_report(model, image_size)
    shape = adapter.encoder_shape(model, image_size)
    plan = getattr(adapter.loop_module(model), "_tome_plan", None)
    num_tokens = shape.num_patches + shape.protected
    if plan is not None and getattr(plan, "prune_kept", None) is not None:
        counts = kept_tokens_per_layer(num_tokens, plan.prune_kept, plan.merge_kept)
    else:
        schedule = plan.layer_r if plan is not None else [0] * shape.num_layers
        counts = tokens_per_layer(num_tokens, schedule, shape.protected)
    return encoder_report(shape, counts[1:], slim_layers(model))
