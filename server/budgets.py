"""Named token budgets a server runs with: each one is a fixed per-layer token schedule.

A budget fixes how many tokens every layer keeps, whatever the image, so every request of a batch has the
same tensor shapes and the batch stays rectangular. Each budget's reduction plan is built once, at start-up
(``hf_tome.build_plan``), and every forward pass of that budget runs it with ``model(..., tome_plan=plan)``: the
shared model is never re-patched per request. Spec strings (``hf-tome serve --budget ...``):

- ``full=r:0``          no merging (identical to the unpatched model)
- ``fast=r:16``         constant r; ``r:16,-1`` adds an inflection (decreasing schedule)
- ``half=macs:0.5``     the smallest constant r whose MACs are at most half the unmerged model's

Options follow as ``,key=value``: ``mode=mlerp`` (``ToMeConfig.merge_mode``), ``rule=pitome`` or
``rule=agglomerative`` (``ToMeConfig.merge_rule``), ``prune=4`` (``ToMeConfig.prune_matched_layers``: ToFu's
pruning in the first 4 layers) and, for ``macs:`` only, ``decay=0.85``: the decaying schedule with the most MACs
under the fraction (``hf_tome.decaying_r_for_macs``) instead of constant r, with ``first=46`` fixing layer 0's step
(the other layers are fitted around it). For example ``half=macs:0.5,decay=0.85,mode=mlerp,prune=4``.
The token counts, and so batching, are fixed by the schedule alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import hf_tome
from hf_tome.config import MERGE_MODES, MERGE_RULES
from hf_tome.integration.flops import constant_r_for_reductions, decaying_r_for_macs

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
        r = self.config.r if isinstance(self.config.r, int) else list(self.config.r)
        return {"name": self.name, "spec": self.spec, "r": r, "inflect": self.config.inflect,
                "merge_rule": self.config.merge_rule, "merge_mode": self.config.merge_mode,
                "prune_matched_layers": self.config.prune_matched_layers,
                "tokens_per_layer": self.tokens_per_layer, "gmacs": round(self.gmacs, 4)}


_OPTIONS = {"mode": ("merge_mode", MERGE_MODES), "rule": ("merge_rule", MERGE_RULES)}


def _options(parts: list[str], spec: str) -> tuple[list[str], dict[str, str]]:
    """Split a spec's comma-separated parts into its positional values and its ``key=value`` options."""
    positional, options = [], {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            positional.append(part)
            continue
        if key not in (*_OPTIONS, "prune", "decay", "first") or key in options:
            raise ValueError(f"budget spec {spec!r} is invalid: option {key!r} is unknown or given twice; expected "
                             "mode=, rule=, prune= or (with macs:) decay= and first=, each at most once")
        allowed = _OPTIONS.get(key, (None, None))[1]
        if allowed is not None and value not in allowed:
            raise ValueError(f"budget spec {spec!r} is invalid: {key}={value!r}, expected one of {list(allowed)}")
        options[key] = value
    return positional, options


def _config_from_spec(model: nn.Module, spec: str, image_size: tuple[int, int] | None) -> hf_tome.ToMeConfig:
    kind, _, value = spec.partition(":")
    positional, options = _options([part.strip() for part in value.split(",")], spec)
    merge = {_OPTIONS[key][0]: options[key] for key in _OPTIONS if key in options}
    try:
        if "prune" in options:  # not an int >= 0: refused below (by int(), or by ToMeConfig)
            merge["prune_matched_layers"] = int(options["prune"])
        if kind == "r" and "decay" not in options and "first" not in options:
            if len(positional) not in (1, 2) or not positional[0]:
                raise ValueError
            inflect = float(positional[1]) if len(positional) == 2 else 0.0
            return hf_tome.ToMeConfig(r=int(positional[0]), inflect=inflect, **merge)
        if kind == "macs" and len(positional) == 1:
            fraction = float(positional[0])
            if not 0.0 < fraction <= 1.0:
                raise ValueError
            if "decay" in options:  # a bad decay or first step is refused by decaying_schedule: the message below
                first = int(options["first"]) if "first" in options else None
                schedule = decaying_r_for_macs(model, fraction, float(options["decay"]), first=first,
                                               image_size=image_size)
                return hf_tome.ToMeConfig(r=schedule, **merge)
            if "first" in options:  # a first step belongs to a decaying schedule
                raise ValueError
            r = constant_r_for_reductions(model, [1.0 / fraction], image_size)[1.0 / fraction]
            return hf_tome.ToMeConfig(r=r, **merge)
    except ValueError as error:
        if str(error).startswith("MACs "):  # out of reach: that message names the value already
            raise
    raise ValueError(f"budget spec {spec!r} is invalid: expected 'r:<int>', 'r:<int>,<inflect>' or "
                     f"'macs:<fraction in (0, 1]>', then optionally ',mode=<{'|'.join(MERGE_MODES)}>', "
                     f"',rule=<{'|'.join(MERGE_RULES)}>', ',prune=<int >= 0>' or (macs: only) "
                     "',decay=<factor in (0, 1]>' and then ',first=<int >= 0>'")


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
