"""MACs accounting for ViT-style encoders, per layer, with and without token reduction.

One block with C channels, MLP width I, N tokens entering and N' after its reduction costs
``4*N*C^2 + 2*N^2*C`` (attention at N) plus ``2*N'*C*I`` (MLP at N'; ``8*N'*C^2`` for the usual I = 4C).
Patch embedding adds ``N_patches * C * channels * p^2`` and the classifier ``C * num_classes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from hf_tome.config import ToMeConfig
from hf_tome.core.macs import ComputeReport, block_macs, encoder_report, nearest_r
from hf_tome.core.plan import ReductionPlan
from hf_tome.core.schedule import decaying_schedule, kept_tokens_per_layer, smallest_scale_within, tokens_per_layer
from hf_tome.integration.patch import build_plan
from hf_tome.integration.registry import find_adapter, slim_layers, unwrap_compiled

__all__ = ["ComputeReport", "block_macs", "compute_report", "constant_r_for_macs", "constant_r_for_reductions",
           "decaying_r_for_macs", "encoder_report"]


def compute_report(model: nn.Module, image_size: tuple[int, int] | None = None, *,
                   plan: ReductionPlan | None = None, config: ToMeConfig | None = None) -> ComputeReport:
    """Tokens entering each layer and the MACs per image of ``model`` under a plan, without changing the model.

    The plan is ``plan``, else the one ``hf_tome.build_plan`` makes of ``config``, else the model's own (what
    ``hf_tome.apply`` set; none: no reduction). Works on patched and unpatched models, compiled ones too
    (``torch.compile``). ``image_size`` (height, width) defaults to the config's.
    """
    model = unwrap_compiled(model)
    adapter = find_adapter(model)
    if plan is None and config is not None:
        plan = build_plan(model, config)
    if plan is None:
        plan = getattr(adapter.loop_module(model), "_tome_plan", None)
    if adapter.compute_report is not None:  # e.g. windowed attention, which the formula above does not describe
        return adapter.compute_report(model, image_size, plan)
    shape = adapter.encoder_shape(model, image_size)
    num_tokens = shape.num_patches + shape.protected
    if plan is not None and plan.prune_kept is not None:
        counts = kept_tokens_per_layer(num_tokens, plan.prune_kept, plan.merge_kept)
    else:
        schedule = plan.layer_r if plan is not None else [0] * shape.num_layers
        counts = tokens_per_layer(num_tokens, schedule, shape.protected)
    return encoder_report(shape, counts[1:], slim_layers(model))


def _constant_r_curve(model: nn.Module, image_size: tuple[int, int] | None,
                      inflect: float) -> tuple[float, Callable[[int], float], int]:
    """The unreduced MACs, MACs as a function of a constant r (read off plans), and the largest r worth trying."""
    model = unwrap_compiled(model)
    full = compute_report(model, image_size, config=ToMeConfig(r=0))

    def macs_of(r: int) -> float:
        return compute_report(model, image_size, config=ToMeConfig(r=r, inflect=inflect)).total_macs

    # No layer merges more than half of its tokens, so a larger r than the input's token count changes nothing.
    return full.total_macs, macs_of, full.tokens_in[0]


def constant_r_for_macs(model: nn.Module, target: float, *, image_size: tuple[int, int] | None = None,
                        inflect: float = 0.0, side: str = "at_most") -> int:
    """The constant-r ToMe schedule nearest a MACs target, read off the plans (the model is not changed).

    ``target`` is a fraction (<= 1) of the unreduced model's MACs at ``image_size``, or MACs per image (> 1).
    ``side="at_most"``: the smallest r whose MACs are at most the target; ``"at_least"``: the largest r whose MACs
    are still at least the target. ``ValueError`` naming the reach when no r qualifies.
    """
    full, macs_of, max_r = _constant_r_curve(model, image_size, inflect)
    target_macs = target * full if target <= 1 else target
    found = nearest_r(macs_of, target_macs, max_r, side)
    if found is None:
        raise ValueError(f"MACs target {target:.4g} is out of reach with constant r for this model: r=0 to {max_r} "
                         f"give {macs_of(max_r) / full:.4f} to 1 of the full model's MACs")
    return found


def decaying_r_for_macs(model: nn.Module, target: float, decay: float, *, first: int | None = None,
                        image_size: tuple[int, int] | None = None) -> list[int]:
    """The :func:`~hf_tome.core.schedule.decaying_schedule` of ``decay`` with the most MACs at most ``target``.

    ``target`` is a fraction (<= 1) of the unreduced model's MACs at ``image_size``, or MACs per image (> 1). The
    result is a per-layer list for ``ToMeConfig(r=...)``: layer ``i`` merges about ``scale * decay ** i`` tokens,
    with ``scale`` found by bisection (MACs never rise as it grows). ``first`` fixes layer 0's step and fits the
    other layers around it. ``ValueError`` when even merging as much as every layer allows does not reach the
    target.
    """
    model = unwrap_compiled(model)
    full = compute_report(model, image_size, config=ToMeConfig(r=0))
    num_layers, max_r = len(full.tokens_in), full.tokens_in[0]
    decaying_schedule(0.0, decay, num_layers, first)  # refuses a bad decay or first step before they are used
    target_macs = target * full.total_macs if target <= 1 else target

    def macs_of(scale: float) -> int:
        schedule = decaying_schedule(scale, decay, num_layers, first)
        return compute_report(model, image_size, config=ToMeConfig(r=schedule)).total_macs

    high = float(max_r) / decay ** (num_layers - 1)  # every layer merges all it can
    scale = smallest_scale_within(macs_of, target_macs, high)
    if scale is None:
        step = "" if first is None else f" and first={first}"
        raise ValueError(f"MACs target {target:.4g} is out of reach with decay={decay}{step} for this model: the "
                         f"most merging gives {macs_of(high) / full.total_macs:.4f} of the full model's MACs")
    return decaying_schedule(scale, decay, num_layers, first)


def constant_r_for_reductions(model: nn.Module, reductions: Sequence[float],
                              image_size: tuple[int, int] | None = None) -> dict[float, int]:
    """For every MACs reduction factor, the smallest constant r that reaches it (e.g. ``{1.5: 9, 2.0: 14}``).

    Raises ``ValueError`` naming the factor when it is below 1 or even the largest r cannot reach it.
    """
    full, macs_of, max_r = _constant_r_curve(model, image_size, 0.0)
    found: dict[float, int] = {}
    for factor in sorted(reductions):
        if factor < 1.0:
            raise ValueError(f"MACs reduction {factor} is invalid: expected a factor >= 1.0")
        r = nearest_r(macs_of, full / factor, max_r)
        if r is None:
            raise ValueError(f"MACs reduction {factor}x is out of reach with constant r for this model "
                             f"(largest r={max_r} gives {full / macs_of(max_r):.2f}x)")
        found[factor] = r
    return found
