"""The registry of model families hf_tome can patch, and how each family describes itself."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class EncoderShape:
    """Sizes the FLOPs formula needs, for one model at one input size."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_patches: int
    protected: int
    patch_macs_per_patch: int  # MACs of embedding one patch (channels * patch area * hidden)
    head_macs: int  # MACs of the classifier(s) on top, 0 for a bare backbone


@dataclass(frozen=True)
class Adapter:
    """How hf_tome patches one model family.

    class_map: stock transformers class -> hf_tome subclass, swapped in place on ``apply`` and back on
        ``remove`` (weights, parameter names and hooks stay untouched).
    supported: the top-level model classes users may pass.
    loop_module: returns the submodule that runs the encoder loop and holds the reduction plan.
    encoder_shape: sizes for FLOPs accounting at a given (height, width), or the config's image size.
    plan_builder: optional ``(model, ToMeConfig) -> ReductionPlan`` for families whose plan is not one r per
        ``config.num_hidden_layers`` layer (e.g. Swin's stages); None uses ``hf_tome.patch.build_plan``'s default.
    compute_report: optional ``(model, image_size) -> ComputeReport`` for families the generic ViT formula of
        ``hf_tome.flops`` does not describe (e.g. windowed attention); None uses ``encoder_shape``.
    supports_pruning: the family's layers accept ``tome_kept`` (unified prune + merge by class attention, see
        ``hf_tome.adapters.common.reduce_layer_tokens``); ``prune_kept``/``merge_kept`` are refused otherwise.
    extra_keys: the ``ToMeConfig.extra`` keys the family reads (e.g. Swin's ``"swin_stage_r"``); ``apply``
        refuses other keys, except the family-independent ones of ``hf_tome.budget.BUDGET_EXTRA_KEYS``.
    """

    family: str
    class_map: dict[type[nn.Module], type[nn.Module]]
    supported: tuple[type[nn.Module], ...]
    protected_tokens: Callable[[PretrainedConfig], int]
    loop_module: Callable[[nn.Module], nn.Module]
    encoder_shape: Callable[[nn.Module, tuple[int, int] | None], EncoderShape]
    plan_builder: Callable[[nn.Module, Any], Any] | None = None
    compute_report: Callable[[nn.Module, tuple[int, int] | None], Any] | None = None
    supports_pruning: bool = False
    extra_keys: tuple[str, ...] = ()
    reverse_map: dict[type[nn.Module], type[nn.Module]] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reverse_map", {new: old for old, new in self.class_map.items()})


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Make a family patchable by ``hf_tome.apply``."""
    _ADAPTERS.append(adapter)
    _share_checkpoint_conversions(adapter)
    return adapter


def _share_checkpoint_conversions(adapter: Adapter) -> None:
    """Register the stock classes' checkpoint key conversions under the patched classes' names.

    transformers finds a model's key renames (4.x checkpoint names -> 5.x modules) by class name and skips classes
    defined outside ``transformers`` unless their name was registered, so a model patched before its weights are
    loaded (or a patched class loading by itself) would leave renamed layers at random weights. Registering the
    stock mapping through transformers' own API makes it load exactly as the stock class does.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers release without class-name conversions has nothing to share
        return
    for stock, patched in adapter.class_map.items():
        conversions = get_checkpoint_conversion_mapping(stock.__name__)
        if conversions is not None:
            register_checkpoint_conversion_mapping(patched.__name__, conversions, overwrite=True)


def supported_class_names() -> list[str]:
    """Names of every model class hf_tome can patch, for error messages and docs."""
    return sorted(cls.__name__ for adapter in _ADAPTERS for cls in adapter.supported)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``model`` itself when it is not compiled)."""
    # torch.compile imports its wrapper class: while it is not imported, nothing is compiled (and importing dynamo
    # here would slow down every import of hf_tome).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod
    return model


def adapter_or_none(model: nn.Module) -> Adapter | None:
    """The adapter for ``model`` (patched or not), or None when hf_tome does not support its class."""
    for adapter in _ADAPTERS:
        stock = adapter.reverse_map.get(type(model), type(model))
        if stock in adapter.supported:
            return adapter
    return None


def stock_class_of(patched_class: type[nn.Module]) -> type[nn.Module]:
    """The transformers class an hf_tome patched class was made from (``ValueError`` for any other class)."""
    for adapter in _ADAPTERS:
        if patched_class in adapter.reverse_map:
            return adapter.reverse_map[patched_class]
    raise ValueError(f"{patched_class.__name__} is not an hf_tome patched class: expected one made by hf_tome.apply")


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (patched or not); raises ``ValueError`` listing the supported classes."""
    adapter = adapter_or_none(model)
    if adapter is not None:
        return adapter
    raise ValueError(
        f"hf_tome does not support {type(model).__name__}: expected one of {', '.join(supported_class_names())}"
    )
