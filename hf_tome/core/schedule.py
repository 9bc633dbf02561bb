"""Per-layer reduction schedules: how many tokens each layer removes, and how many enter each layer.

Pure Python: the same numbers drive the forward pass, the FLOPs accounting and the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def merge_schedule(r: int | Sequence[int], num_layers: int, inflect: float = 0.0) -> list[int]:
    """Tokens to merge away in each of ``num_layers`` layers (before clamping).

    An int ``r`` with ``inflect`` in [-1, 1] gives ``lo = int(r * (1 - inflect)); hi = 2r - lo`` and layer ``i``
    ``int(lo + (hi - lo) * i / (L - 1))``: constant at 0, decreasing from 2r to 0 at -1. A list is used as given,
    padded with zeros (a longer list is an error: it names layers the model does not have).
    """
    if isinstance(r, int):
        lo = int(r * (1 - inflect))
        hi = 2 * r - lo
        if num_layers == 1:
            return [lo]
        return [int(lo + (hi - lo) * i / (num_layers - 1)) for i in range(num_layers)]
    per_layer = list(r)
    if len(per_layer) > num_layers:
        raise ValueError(f"r has {len(per_layer)} entries but the model has {num_layers} layers: expected at most "
                         f"{num_layers}")
    return per_layer + [0] * (num_layers - len(per_layer))


def decaying_schedule(scale: float, decay: float, num_layers: int, first: int | None = None) -> list[int]:
    """A geometrically decaying schedule: layer ``i`` merges ``round(scale * decay ** i)`` tokens (before clamping).

    Front-loaded like ToMe's ``inflect < 0``, but falling by a constant factor per layer instead of a constant step,
    so the last layers keep merging a few tokens rather than none. ``decay=1`` is a constant ``round(scale)``.
    ``first`` sets layer 0's step on its own (the other layers keep ``round(scale * decay ** i)``), to merge more
    where tokens are most alike. On the embedded DINOv2-S at 2x fewer MACs it measured no better than the plain
    schedule (README, "A larger first step").
    :func:`hf_tome.integration.flops.decaying_r_for_macs` fits ``scale`` to a MACs target.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay={decay!r} is invalid: expected a factor in (0, 1]")
    if scale < 0:
        raise ValueError(f"scale={scale!r} is invalid: expected a number of tokens >= 0")
    if first is not None and (isinstance(first, bool) or not isinstance(first, int) or first < 0):
        raise ValueError(f"first={first!r} is invalid: expected a whole number of tokens >= 0, or None")
    schedule = [int(round(scale * decay**layer)) for layer in range(num_layers)]
    if first is not None and num_layers:
        schedule[0] = first
    return schedule


def smallest_scale_within(cost_of: Callable[[float], float], target: float, high: float) -> float | None:
    """The smallest ``scale`` in [0, ``high``] (to a relative 1e-6) whose ``cost_of(scale) <= target``, for a cost
    that never rises as the scale grows (such as the MACs of :func:`decaying_schedule`); None when even ``high``
    costs more."""
    if cost_of(high) > target:
        return None
    low = 0.0
    if cost_of(low) <= target:
        return low
    while high - low > 1e-6 * max(1.0, high):
        middle = (low + high) / 2
        if cost_of(middle) > target:
            low = middle
        else:
            high = middle
    return high


def clamp_r(r: int, num_tokens: int, protected: int) -> int:
    """At most half of the unprotected tokens can be merged in one bipartite step."""
    return max(0, min(r, (num_tokens - protected) // 2))


def fewest_after_matching(num_tokens: int, protected: int) -> int:
    """The fewest tokens one bipartite step can leave of ``num_tokens`` (it merges at most half the unprotected)."""
    return num_tokens - clamp_r(num_tokens, num_tokens, protected)


def tokens_per_layer(num_tokens: int, schedule: Sequence[int], protected: int) -> list[int]:
    """Token count entering each layer, plus the count leaving the last one (length ``len(schedule) + 1``)."""
    counts = [num_tokens]
    for r in schedule:
        counts.append(counts[-1] - clamp_r(r, counts[-1], protected))
    return counts


def effective_kept(num_tokens: int, prune_kept: int, merge_kept: int) -> tuple[int, int]:
    """Kept counts a layer really applies to ``num_tokens`` tokens: it cannot keep more than enter it."""
    prune = min(prune_kept, num_tokens)
    return prune, min(merge_kept, prune)


def kept_tokens_per_layer(num_tokens: int, prune_kept: Sequence[int], merge_kept: Sequence[int]) -> list[int]:
    """Token count entering each layer under unified compression, plus the count leaving the last one.

    Layer ``i`` leaves ``min(merge_kept[i], prune_kept[i], tokens in)``; layer 0 too, so counts equal to
    ``num_tokens`` there leave block 0 alone (the spec's rule) and smaller ones compress it.
    """
    counts = [num_tokens]
    for prune, merge in zip(prune_kept, merge_kept, strict=True):
        counts.append(effective_kept(counts[-1], prune, merge)[1])
    return counts
