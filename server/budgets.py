"""Named token budgets a server runs with: each one is a fixed per-layer token schedule.

A budget fixes how many tokens every layer keeps, whatever the image, so every request of a batch has the
same tensor shapes and the batch stays rectangular. Each budget's reduction plan is built once, at start-up
(``hf_tome.build_plan``), and every forward pass of that budget runs it with ``model(..., tome_plan=plan)``: the
shared model is never re-patched per request. Spec strings (``hf-tome serve --budget ...``):

- ``full=r:0``          no merging (identical to the unpatched model)
- ``fast=r:16``         constant r; ``r:16,-1`` adds an inflection (decreasing schedule)
- ``half=macs:0.5``     the smallest constant r whose MACs are at most half the unmerged model's
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import hf_tome
from hf_tome.integration.flops import constant_r_for_reductions

DEFAULT_BUDGET_SPECS = ("full=r:0", "half=macs:0.5")


@dataclass
class Budget:
    """One named budget: the ``ToMeConfig`` it runs with, the plan built from it once for the served model (what
    each forward of this budget gets as ``tome_plan=``) and the tokens and MACs that plan implies per image."""

    name: str
    spec: str
    config: hf_tome.ToMeConfig
    tokens_per_layer: list[int]
    gmacs: float
    plan: hf_tome.ReductionPlan

    def summary(self) -> dict:
        return {"name": self.name, "spec": self.spec, "r": self.config.r, "inflect": self.config.inflect,
                "tokens_per_layer": self.tokens_per_layer, "gmacs": round(self.gmacs, 4)}


def _config_from_spec(model: nn.Module, spec: str, image_size: tuple[int, int] | None) -> hf_tome.ToMeConfig:
    kind, _, value = spec.partition(":")
    try:
        if kind == "r":
            parts = [part.strip() for part in value.split(",")]
            if len(parts) not in (1, 2) or not parts[0]:
                raise ValueError
            inflect = float(parts[1]) if len(parts) == 2 else 0.0
            return hf_tome.ToMeConfig(r=int(parts[0]), inflect=inflect)
        if kind == "macs":
            fraction = float(value)
            if not 0.0 < fraction <= 1.0:
                raise ValueError
            r = constant_r_for_reductions(model, [1.0 / fraction], image_size)[1.0 / fraction]
            return hf_tome.ToMeConfig(r=r)
    except ValueError as error:
        if str(error).startswith("MACs reduction"):
            raise
    raise ValueError(f"budget spec {spec!r} is invalid: expected 'r:<int>', 'r:<int>,<inflect>' or "
                     f"'macs:<fraction in (0, 1]>'")


def parse_budgets(model: nn.Module, specs: list[str] | tuple[str, ...],
                  image_size: tuple[int, int] | None = None) -> dict[str, Budget]:
    """Turn ``name=spec`` strings into budgets for ``model`` (the first one is the default).

    Every budget's plan is built here, once; its tokens and MACs are read off that plan. ``model`` is not changed
    (patched or not, it stays as it was).
    """
    budgets: dict[str, Budget] = {}
    for entry in specs:
        name, sep, spec = entry.partition("=")
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"budget {entry!r} is invalid: expected 'name=spec' with a name of letters, digits, "
                             f"'-' or '_' (for example 'half=macs:0.5')")
        if name in budgets:
            raise ValueError(f"budget name {name!r} is given twice")
        config = _config_from_spec(model, spec, image_size)
        plan = hf_tome.build_plan(model, config)
        report = hf_tome.compute_report(model, image_size, plan=plan)
        budgets[name] = Budget(name, spec, config, list(report.tokens_in), report.gmacs, plan)
    if not budgets:
        raise ValueError("no budget given: expected at least one 'name=spec'")
    return budgets
