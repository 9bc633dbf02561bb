"""``apply`` and ``remove``: turning token merging on and off on a loaded transformers model, in place.

Patching swaps the classes of the model's own modules for hf_tome subclasses (like PEFT injects layers):
parameters, their names, devices and hooks are untouched, so training, saving and ``pipeline`` keep working,
and ``remove`` swaps the original classes back.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from hf_tome.config import MERGE_OPTION_DEFAULTS, ToMeConfig
from hf_tome.core.plan import ReductionPlan
from hf_tome.core.schedule import fewest_after_matching, kept_tokens_per_layer, merge_schedule
from hf_tome.integration.budget_table import BUDGET_EXTRA_KEYS, resolve_budget
from hf_tome.integration.registry import Adapter, adapter_or_none, find_adapter, slim_layers, unwrap_compiled


def _num_layers(model: nn.Module) -> int:
    return model.config.num_hidden_layers


def build_plan(model: nn.Module, config: ToMeConfig | None = None, **overrides: Any) -> ReductionPlan:
    """The immutable per-layer reduction of ``model`` under ``config``, checked against the model; nothing changes.

    Hand it to any forward of a patched model, ``model(pixel_values=x, tome_plan=plan)``, to run that configuration
    for one call (the model's own plan, set by :func:`apply`, is untouched), or to
    ``hf_tome.compute_report(model, plan=plan)`` for its MACs. ``config`` and ``**overrides`` are read as by
    :func:`apply` (a budget selects its table row; unknown fields raise ``ValueError``).
    """
    model = unwrap_compiled(model)
    return _plan_of(model, _resolved_config(model, config, overrides))


def _plan_of(model: nn.Module, config: ToMeConfig) -> ReductionPlan:
    """:func:`build_plan` of a config whose budget is already resolved to kept counts."""
    adapter = find_adapter(model)
    _check_extra_keys(config, adapter)
    if config.prune_kept is not None and not adapter.supports_pruning:
        raise ValueError(f"ToMeConfig.prune_kept={config.prune_kept} is invalid for {type(model).__name__}: the "
                         f"{adapter.family} adapter does not support prune + merge (its encoder has no class token "
                         "whose attention could rank the tokens); expected prune_kept=None (use r for token merging)")
    _check_merge_options(model, config, adapter)
    if adapter.plan_builder is not None:  # families with stages (Swin) count layers their own way
        return adapter.plan_builder(model, config)
    num_layers = _num_layers(model)
    if config.prune_matched_layers > num_layers:
        raise ValueError(f"ToMeConfig.prune_matched_layers={config.prune_matched_layers} is invalid for "
                         f"{type(model).__name__}: it has {num_layers} layers; expected at most {num_layers}")
    layer_r = merge_schedule(config.r, num_layers, config.inflect)
    protected = adapter.protected_tokens(model.config)
    prune_kept, merge_kept = config.prune_kept, config.merge_kept
    # Blocks without attention (DC-ViT's slim blocks, a structure hook) have no keys or class attention: they
    # reduce nothing and
    # the token count carries through them.
    for index in sorted(slim_layers(model)):
        layer_r[index] = 0
        if prune_kept is not None and index < len(prune_kept):  # a wrong length is refused below
            prune_kept, merge_kept = list(prune_kept), list(merge_kept)
            prune_kept[index] = merge_kept[index] = merge_kept[index - 1] if index else prune_kept[0]
    if prune_kept is not None:
        _check_kept_against_model(config, num_layers, protected, prune_kept, merge_kept)
    if prune_kept is not None and config.merge_match == "bipartite":
        _check_bipartite_reach(prune_kept, merge_kept, protected)
    return ReductionPlan(layer_r=layer_r, protected=protected, prop_attn=config.prop_attn,
                         trace_source=config.trace_source, prune_kept=prune_kept, merge_kept=merge_kept,
                         merge_match=config.merge_match, merge_rule=config.merge_rule, merge_mode=config.merge_mode,
                         prune_matched_layers=config.prune_matched_layers)


def _takes_merge_options(adapter: Adapter) -> bool:
    """True when the family's patched layers take a ``tome_merge`` keyword (see ``run_layers``)."""
    return any("tome_merge" in inspect.signature(patched.forward).parameters
               for patched in adapter.class_map.values())


def _check_merge_options(model: nn.Module, config: ToMeConfig, adapter: Adapter) -> None:
    """Refuse a merge rule or mode other than ToMe's for a family whose layers would not apply it (rather than
    merging with ToMe's rule while the config says otherwise)."""
    changed = [(name, getattr(config, name), default) for name, default in MERGE_OPTION_DEFAULTS.items()
               if getattr(config, name) != default]
    if not changed or _takes_merge_options(adapter):
        return
    name, value, default = changed[0]
    raise ValueError(f"ToMeConfig.{name}={value!r} is invalid for {type(model).__name__}: the {adapter.family} "
                     f"adapter's layers do not take merge rules or modes (no tome_merge keyword); expected "
                     f"{name}={default!r}")


def _resolved_config(model: nn.Module, config: ToMeConfig | None, overrides: dict[str, Any]) -> ToMeConfig:
    """``config`` (default ``ToMeConfig()``) with ``overrides`` applied and its budget resolved to kept counts."""
    config = config or ToMeConfig()
    if overrides:
        if ({"prune_kept", "merge_kept"} & overrides.keys()) and "budget" not in overrides:
            overrides = {**overrides, "budget": None}  # explicit kept counts replace a budget's row
        config = config.replace(**overrides)
    return resolve_budget(model, config)  # a budget selects its table row's kept counts


def _check_bipartite_reach(prune_kept: list[int], merge_kept: list[int], protected: int) -> None:
    """One bipartite step merges at most half of the unprotected survivors of pruning: refuse counts that need
    more, instead of silently keeping more tokens (and FLOPs) than the config says."""
    counts = kept_tokens_per_layer(prune_kept[0], prune_kept, merge_kept)
    for index in range(len(prune_kept)):  # block 0 too: its counts may compress it
        survivors = min(prune_kept[index], counts[index])
        lowest = fewest_after_matching(survivors, protected)
        if min(merge_kept[index], survivors) < lowest:
            raise ValueError(f"ToMeConfig.merge_kept={merge_kept} is invalid with merge_match='bipartite': layer "
                             f"{index} would merge {survivors} tokens down to {merge_kept[index]}, but one bipartite "
                             f"step merges at most half of the {survivors - protected} unprotected ones; expected "
                             f"merge_kept[{index}] >= {lowest}")


def _check_extra_keys(config: ToMeConfig, adapter: Adapter) -> None:
    """Every ``extra`` key is one the family reads or one of the budget search's."""
    allowed = (*adapter.extra_keys, *BUDGET_EXTRA_KEYS)
    unknown = sorted(key for key in config.extra if key not in allowed)
    if unknown:
        raise ValueError(f"ToMeConfig.extra has unknown key(s) {unknown} for the {adapter.family} adapter: expected "
                         f"some of {sorted(allowed)}")


def _check_kept_against_model(config: ToMeConfig, num_layers: int, protected: int, prune_kept: list[int],
                              merge_kept: list[int]) -> None:
    """One count per layer, every count leaves at least one unprotected token to merge into, and no layer keeps
    more tokens than enter it. ``prune_kept``/``merge_kept`` are the config's counts after the DC-ViT adjustment.
    """
    for name in ("prune_kept", "merge_kept"):
        kept = getattr(config, name)
        if len(kept) != num_layers:
            raise ValueError(f"ToMeConfig.{name}={kept} is invalid for this model: expected {num_layers} entries, "
                             "one per layer")
        if min(kept) <= protected:
            raise ValueError(f"ToMeConfig.{name}={kept} is invalid for this model: expected every entry > "
                             f"{protected} (its protected tokens plus at least one patch token)")
    # Layer 0's input depends on the input size: the encoder loop checks it (hf_tome.integration.encoder.run_layers).
    for index in range(1, num_layers):
        if prune_kept[index] > merge_kept[index - 1]:
            raise ValueError(f"ToMeConfig.prune_kept={config.prune_kept} is invalid: layer {index} keeps "
                             f"{prune_kept[index]} tokens, but only merge_kept[{index - 1}]={merge_kept[index - 1]} "
                             f"enter it; expected prune_kept[{index}] <= {merge_kept[index - 1]}")


def apply(model: nn.Module, config: ToMeConfig | None = None, **overrides: Any) -> nn.Module:
    """Patch ``model`` in place with token merging and return it.

    Args:
        model: a loaded transformers model of a supported class (see the README); already patched models
            are re-configured. A ``torch.compile`` wrapper is patched through the module it wraps and returned;
            dynamo guards on the module classes and the plan, so its next call recompiles (no stale graph).
        config: the settings; default ``ToMeConfig()`` (r=0: patched but identical outputs).
        **overrides: ``ToMeConfig`` fields that replace those of ``config`` (e.g. ``r=16``; ToMe's
            ``r=(16, -1)`` replaces ``inflect`` too). Unknown names raise ``ValueError`` listing the fields.

    The config is stored as a plain dict under ``model.config.tome`` so ``save_pretrained`` keeps it.
    """
    compiled, model = model, unwrap_compiled(model)
    adapter = find_adapter(model)
    config = _resolved_config(model, config, overrides)
    plan = _plan_of(model, config)  # validates against the model before anything is changed
    for module in model.modules():
        replacement = adapter.class_map.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            if isinstance(module, PreTrainedModel):
                # transformers looks up which outputs a model can record by class name. Keyed by that name
                # directly: 5.23 made the registry turn a model key into the name, 5.18-5.22 expect the name.
                dict.__setitem__(_CAN_RECORD_REGISTRY, str(type(module)), module._can_record_outputs)
    adapter.loop_module(model)._tome_plan = plan
    model.config.tome = config.to_dict()
    return compiled


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: restore the original classes (and forward) and drop ``config.tome``.

    Safe on a model that is not patched (nothing to restore) or not supported (returned unchanged), so callers
    need no ``is_patched`` check first. A ``torch.compile`` wrapper is handled through the module it wraps.
    """
    compiled, model = model, unwrap_compiled(model)
    adapter = adapter_or_none(model)
    if adapter is None:
        return compiled
    loop_module = adapter.loop_module(model)
    for module in model.modules():
        original = adapter.reverse_map.get(type(module))
        if original is not None:
            module.__class__ = original
    if "_tome_plan" in vars(loop_module):
        del loop_module._tome_plan
    if hasattr(model.config, "tome"):
        del model.config.tome
    return compiled


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` (or the module ``torch.compile`` wrapped) currently runs hf_tome's forward; False for
    models hf_tome does not support."""
    model = unwrap_compiled(model)
    adapter = adapter_or_none(model)
    return adapter is not None and type(model) in adapter.reverse_map


def tome_config_of(model: nn.Module) -> ToMeConfig | None:
    """The ``ToMeConfig`` a patched model runs with (None for an unpatched one)."""
    model = unwrap_compiled(model)
    if not is_patched(model):
        return None
    data = getattr(model.config, "tome", None)
    return ToMeConfig.from_dict(data) if data is not None else None
