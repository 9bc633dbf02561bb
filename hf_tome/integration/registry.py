"""The registry of model families hf_tome can patch, how each family describes itself, and structure hooks.

The bottom of the transformers glue: it imports neither torch nor transformers, so ``import hf_tome`` can name the
built-in plugins (:func:`set_builtin_plugins`) without loading them; they are imported on the first look-up.

A new model family is one module under ``hf_tome/adapters/`` that calls :func:`register_adapter` (see the README's
architecture section). A change of architecture recorded in a model's config, such as DC-ViT's slim blocks, reaches
the loader, the plans and the MACs through a :class:`StructureHook`, so none of them imports the method.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

    from hf_tome.core.macs import EncoderShape


@dataclass(frozen=True)
class Adapter:
    """How hf_tome patches one model family.

    class_map: stock transformers class -> hf_tome subclass, swapped in place on ``apply`` and back on
        ``remove`` (weights, parameter names and hooks stay untouched).
    supported: the top-level model classes users may pass.
    loop_module: returns the submodule that runs the encoder loop and holds the reduction plan.
    encoder_shape: sizes for FLOPs accounting at a given (height, width), or the config's image size.
    plan_builder: optional ``(model, ToMeConfig) -> ReductionPlan`` for families whose plan is not one r per
        ``config.num_hidden_layers`` layer (e.g. Swin's stages); None uses
        ``hf_tome.integration.patch.build_plan``'s default.
    compute_report: optional ``(model, image_size) -> ComputeReport`` for families the generic ViT formula of
        ``hf_tome.integration.flops`` does not describe (e.g. windowed attention); None uses ``encoder_shape``.
    supports_pruning: the family's layers accept ``tome_kept`` (unified prune + merge by class attention, see
        ``hf_tome.integration.encoder.reduce_layer_tokens``); ``prune_kept``/``merge_kept`` are refused otherwise.
    extra_keys: the ``ToMeConfig.extra`` keys the family reads (e.g. Swin's ``"swin_stage_r"``); ``apply``
        refuses other keys, except the family-independent ones of
        ``hf_tome.integration.budget_table.BUDGET_EXTRA_KEYS``.
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


@dataclass(frozen=True)
class StructureHook:
    """A change of architecture that a model's config records under ``config_key`` (e.g. DC-ViT's slim blocks).

    rebuild: gives a freshly built model (random or meta weights) the modules its config describes, so
        ``from_pretrained`` loads the saved weights into matching modules.
    slim_layers: ``{block index: kept MLP units}`` of the blocks that lost their attention: they reduce no tokens
        (no keys to match on) and their MACs are the slim MLP's.
    save_extras: writes files beside ``save_pretrained``'s into the given folder.
    push_to_hub: replaces ``push_to_hub`` for models carrying the change ``(model, repo_id, **kwargs)``.
    model_card: ``(model, repo_id or None) -> huggingface_hub.ModelCard``, the card of a model carrying the change
        (DC-ViT's names its blocks and measured figures), written instead of the generic one when it is shared.
    """

    config_key: str
    rebuild: Callable[[nn.Module], Any]
    slim_layers: Callable[[nn.Module], dict[int, int]]
    save_extras: Callable[[nn.Module, str], None] | None = None
    push_to_hub: Callable[..., Any] | None = None
    model_card: Callable[[nn.Module, str | None], Any] | None = None


@dataclass(frozen=True)
class Publisher:
    """What sharing an hf_tome model adds to transformers' files (``hf_tome.hub``: remote code, ``auto_map``, card).

    save_extras: ``(model, folder)`` run after ``save_pretrained`` has written the model into ``folder``.
    push_to_hub: ``(model, repo_id, **kwargs)`` replacing transformers' ``push_to_hub`` (None keeps it).
    """

    name: str
    save_extras: Callable[[nn.Module, str], None]
    push_to_hub: Callable[..., Any] | None = None


_ADAPTERS: list[Adapter] = []
_STRUCTURE_HOOKS: list[StructureHook] = []
_PUBLISHERS: list[Publisher] = []
_BUILTIN_PLUGINS: tuple[str, ...] = ()
_builtins_loaded = False


def set_builtin_plugins(modules: tuple[str, ...]) -> None:
    """Name the modules that register the shipped families and hooks; imported on the first look-up."""
    global _BUILTIN_PLUGINS, _builtins_loaded
    _BUILTIN_PLUGINS, _builtins_loaded = tuple(modules), False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # before importing: the plugins call register_* while they import
        try:
            for module in _BUILTIN_PLUGINS:
                importlib.import_module(module)
        except BaseException:
            _builtins_loaded = False  # the next look-up retries (and raises again) instead of a partial registry
            raise


def register_structure_hook(hook: StructureHook) -> StructureHook:
    """Make a config-recorded architecture change known to the loader, ``build_plan`` and ``compute_report``."""
    _STRUCTURE_HOOKS[:] = [known for known in _STRUCTURE_HOOKS if known.config_key != hook.config_key] + [hook]
    return hook


def structure_hooks(config: Any) -> list[StructureHook]:
    """The hooks whose change ``config`` (a model's ``PretrainedConfig``) records."""
    _load_builtins()
    return [hook for hook in _STRUCTURE_HOOKS if getattr(config, hook.config_key, None)]


def register_publisher(publisher: Publisher) -> Publisher:
    """Make ``save_pretrained``/``push_to_hub`` of hf_tome models write what ``publisher`` adds (one per name)."""
    _PUBLISHERS[:] = [known for known in _PUBLISHERS if known.name != publisher.name] + [publisher]
    return publisher


def publishers() -> list[Publisher]:
    """The registered publishers (the built-in plugins are imported first)."""
    _load_builtins()
    return list(_PUBLISHERS)


def slim_layers(model: nn.Module) -> dict[int, int]:
    """``{block index: kept MLP units}`` of every block of ``model`` without attention (empty for most models)."""
    layers: dict[int, int] = {}
    for hook in structure_hooks(model.config):
        layers.update(hook.slim_layers(model))
    return layers


def register_adapter(adapter: Adapter) -> Adapter:
    """Make a family patchable by ``hf_tome.apply``."""
    _ADAPTERS.append(adapter)
    share_checkpoint_conversions(adapter.class_map)
    return adapter


def share_checkpoint_conversions(class_map: dict[type[nn.Module], type[nn.Module]]) -> None:
    """Register the stock classes' checkpoint key conversions under the names of their subclasses in ``class_map``
    (stock class -> subclass: the patched classes, the remote-code classes of ``hf_tome.hub``).

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
    for stock, patched in class_map.items():
        conversions = get_checkpoint_conversion_mapping(stock.__name__)
        if conversions is not None:
            register_checkpoint_conversion_mapping(patched.__name__, conversions, overwrite=True)


def registered_adapters() -> tuple[Adapter, ...]:
    """Every registered family (the built-in ones are imported first)."""
    _load_builtins()
    return tuple(_ADAPTERS)


def supported_class_names() -> list[str]:
    """Names of every model class hf_tome can patch, for error messages and docs."""
    _load_builtins()
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
    _load_builtins()
    for adapter in _ADAPTERS:
        stock = adapter.reverse_map.get(type(model), type(model))
        if stock in adapter.supported:
            return adapter
    return None


def stock_class_of(patched_class: type[nn.Module]) -> type[nn.Module]:
    """The transformers class an hf_tome patched class was made from (``ValueError`` for any other class)."""
    _load_builtins()
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
