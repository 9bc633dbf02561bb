"""From a MACs target to a DC-ViT block plan: how many blocks lose attention and how many MLP units they keep.

With ``A`` the MACs of one block's attention, ``M`` those of its MLP and ``u = 2 * N * C`` those of one MLP
hidden unit, removing ``R`` MACs takes ``k = ceil(R / (A + M))`` blocks without attention, whose MLPs together
give up the remaining ``R - k * A`` MACs: every target in the feasible range is met to within one unit ``u``.
Block dropping (the baseline) removes ``round(R / (A + M))`` whole blocks instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from hf_tome.integration.flops import block_macs, encoder_report
from hf_tome.integration.registry import find_adapter


@dataclass(frozen=True)
class BlockCosts:
    """MACs per image of one uncompressed block's parts, and of the whole model."""

    attention_macs: int
    unit_macs: int  # one MLP hidden unit (fc1 row + fc2 column) over all tokens
    mlp_units: int
    full_macs: int
    num_layers: int

    @property
    def block_macs(self) -> int:
        return self.attention_macs + self.unit_macs * self.mlp_units


@dataclass(frozen=True)
class BlockPlan:
    """What to compress: ``num_blocks`` blocks lose attention and share ``kept_units`` MLP units."""

    num_blocks: int
    kept_units: int
    target_macs: int
    planned_macs: int
    costs: BlockCosts


def block_costs(model: nn.Module, image_size: tuple[int, int] | None = None) -> BlockCosts:
    """Costs of ``model``'s blocks before any compression or token reduction (uniform blocks assumed)."""
    shape = find_adapter(model).encoder_shape(model, image_size)
    tokens, width = shape.num_patches + shape.protected, shape.hidden_size
    full = encoder_report(shape, [tokens] * shape.num_layers).total_macs
    return BlockCosts(attention_macs=block_macs(width, 0, tokens, tokens),
                      unit_macs=block_macs(width, 1, tokens, tokens, attention=False),
                      mlp_units=shape.intermediate_size, full_macs=full, num_layers=shape.num_layers)


def target_to_macs(target: float, full_macs: int) -> int:
    """A target given as a fraction (<= 1) of the full model or as GMACs (> 1) per image, in MACs."""
    if isinstance(target, bool) or not isinstance(target, int | float) or target <= 0:
        raise ValueError(f"MACs target {target!r} is invalid: expected a fraction in (0, 1] of the full model or "
                         "GMACs per image (> 1)")
    return round(target * full_macs) if target <= 1 else round(target * 1e9)


def feasible_range(costs: BlockCosts, max_blocks: int) -> tuple[int, int]:
    """(lowest, highest) MACs DC-ViT reaches compressing 1..``max_blocks`` blocks."""
    return costs.full_macs - max_blocks * costs.block_macs, costs.full_macs - costs.attention_macs


def plan_blocks(costs: BlockCosts, target: float, method: str = "dc-vit", max_blocks: int | None = None) -> BlockPlan:
    """The block plan reaching ``target`` MACs; ``method`` ``"dc-vit"`` (dense) or ``"drop"`` (whole blocks).

    ``max_blocks`` defaults to every block but the first and last. Targets outside the feasible range raise
    ``ValueError`` naming it.
    """
    max_blocks = costs.num_layers - 2 if max_blocks is None else max_blocks
    target_macs = target_to_macs(target, costs.full_macs)
    removed = costs.full_macs - target_macs
    low, high = feasible_range(costs, max_blocks)
    if method == "drop":
        num_blocks = round(removed / costs.block_macs)
        if not 1 <= num_blocks <= max_blocks:
            raise ValueError(f"MACs target {target!r} ({target_macs / 1e9:.4g} GMACs) is out of reach by dropping "
                             f"1..{max_blocks} whole blocks: expected {low / 1e9:.4g}..."
                             f"{(costs.full_macs - costs.block_macs / 2) / 1e9:.4g} GMACs")
        return BlockPlan(num_blocks, 0, target_macs, costs.full_macs - num_blocks * costs.block_macs, costs)
    if method != "dc-vit":
        raise ValueError(f"method={method!r} is invalid: expected 'dc-vit' or 'drop'")
    num_blocks = math.ceil(removed / costs.block_macs) if removed > 0 else 0
    units_removed = round((removed - num_blocks * costs.attention_macs) / costs.unit_macs)
    if not 1 <= num_blocks <= max_blocks or units_removed < 0:
        raise ValueError(f"MACs target {target!r} ({target_macs / 1e9:.4g} GMACs) is outside the range DC-ViT "
                         f"reaches: expected {low / 1e9:.4g}...{high / 1e9:.4g} GMACs ({low / costs.full_macs:.1%} to "
                         f"{high / costs.full_macs:.1%} of the full {costs.full_macs / 1e9:.4g})")
    kept_units = num_blocks * costs.mlp_units - units_removed
    planned = costs.full_macs - num_blocks * costs.attention_macs - units_removed * costs.unit_macs
    return BlockPlan(num_blocks, kept_units, target_macs, planned, costs)
