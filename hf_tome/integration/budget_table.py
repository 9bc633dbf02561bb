"""FLOPs budgets: picking a row of a searched budget table, and the numbers every row carries.

A budget table (written by ``hf-tome search``) maps a compute budget to per-layer kept counts. Rows are
``{"gflops", "fraction", "prune_kept", "merge_kept", "accuracy"}`` (plus ``"merge_match"`` and, from a search,
``"origin"``: e.g. ``"tome r=12"`` for a row that is ToMe's own schedule written as kept counts, block 0
included); "gflops" are GMACs per image (the spec's "FLOPs" counts multiply-accumulates), "fraction" is that over
the uncompressed model's GMACs at the same input size. A budget is either GFLOPs (> 1) or a fraction of the full
model (<= 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from hf_tome.config import ToMeConfig
from hf_tome.core.macs import encoder_report
from hf_tome.integration.registry import find_adapter

FULL_GFLOPS_KEY = "budget_full_gflops"
"""``ToMeConfig.extra`` key: GMACs of the uncompressed model at the input size the table was searched at."""
IMAGE_SIZE_KEY = "budget_image_size"
"""``ToMeConfig.extra`` key: the (height, width) the table was searched at."""
BUDGET_EXTRA_KEYS = (FULL_GFLOPS_KEY, IMAGE_SIZE_KEY)
"""The ``ToMeConfig.extra`` keys a budget search stores, accepted for every model family."""


def full_gflops_for_tokens(model: nn.Module, num_tokens: int) -> float:
    """GMACs of ``model`` without any reduction when ``num_tokens`` tokens (protected included) enter block 0."""
    adapter = find_adapter(model)
    shape = adapter.encoder_shape(model, None)
    shape = replace(shape, num_patches=num_tokens - shape.protected)
    return encoder_report(shape, [num_tokens] * shape.num_layers).gmacs


def table_full_gflops(model: nn.Module, config: ToMeConfig) -> float:
    """GMACs of the uncompressed model the table of ``config`` refers to (stored, or derived from block 0)."""
    stored = config.extra.get(FULL_GFLOPS_KEY)
    if stored:
        return float(stored)
    # A row that leaves block 0 alone (prune_kept[0] == merge_kept[0]) names the token count the table was made
    # for; rows that compress block 0 do not, and then the model's own input size stands in.
    for row in config.budget_table:
        if row["prune_kept"][0] == row["merge_kept"][0]:
            return full_gflops_for_tokens(model, int(row["prune_kept"][0]))
    shape = find_adapter(model).encoder_shape(model, None)
    return full_gflops_for_tokens(model, shape.num_patches + shape.protected)


def budget_in_gflops(budget: float, full_gflops: float) -> float:
    """A budget as GFLOPs: values <= 1 are fractions of ``full_gflops``, larger values are GFLOPs already."""
    return budget * full_gflops if budget <= 1 else float(budget)


def select_budget_row(table: Sequence[dict[str, Any]], budget: float, full_gflops: float) -> dict[str, Any]:
    """The row with the most GFLOPs not above ``budget`` (GFLOPs, or a fraction <= 1 of ``full_gflops``).

    A budget above every row gets the largest row; one below every row raises ``ValueError`` naming the range
    the table covers, in GFLOPs and as fractions of the full model.
    """
    if not table:
        raise ValueError("ToMeConfig.budget_table=[] is invalid: expected at least one row (run `hf-tome search`)")
    target = budget_in_gflops(budget, full_gflops)
    rows = sorted(table, key=lambda row: row["gflops"])
    eligible = [row for row in rows if row["gflops"] <= target * (1 + 1e-9)]
    if not eligible:
        low, high = rows[0]["gflops"], rows[-1]["gflops"]
        raise ValueError(
            f"tome_budget={budget} ({target:.4g} GFLOPs) is below the budget table, which covers {low:.4g} to "
            f"{high:.4g} GFLOPs ({low / full_gflops:.3f} to {high / full_gflops:.3f} of the full model's "
            f"{full_gflops:.4g}): expected a budget >= {low:.4g} GFLOPs or a fraction >= {low / full_gflops:.3f}"
        )
    return eligible[-1]


def resolve_budget(model: nn.Module, config: ToMeConfig) -> ToMeConfig:
    """``config`` with ``prune_kept``/``merge_kept`` taken from the table row its ``budget`` selects.

    A config without a budget is returned unchanged; a budget without a table raises ``ValueError``.
    """
    if config.budget is None:
        return config
    if not config.budget_table:
        raise ValueError(f"ToMeConfig.budget={config.budget} is invalid: expected a model whose config has a "
                         "budget_table (written by `hf-tome search`)")
    row = select_budget_row(config.budget_table, config.budget, table_full_gflops(model, config))
    return config.replace(r=0, prune_kept=list(row["prune_kept"]), merge_kept=list(row["merge_kept"]),
                          merge_match=row.get("merge_match", "class_attention"))
