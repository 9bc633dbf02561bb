"""Budget specs of the server (``name=spec[,options]``): token counts, MACs, plans and the refusals, without a
server."""

from __future__ import annotations

import json

import pytest
from conftest import make_model
from hf_tome_server.budgets import parse_budgets

import hf_tome
from hf_tome.core.schedule import merge_schedule
from hf_tome.integration.flops import decaying_r_for_macs
from hf_tome.integration.registry import find_adapter


def test_budgets_fix_tokens_per_layer_and_macs() -> None:
    model = make_model("vit-cls")
    budgets = parse_budgets(model, ["full=r:0", "fast=r:4", "dec=r:4,-1", "half=macs:0.5"])
    assert list(budgets) == ["full", "fast", "dec", "half"]
    assert not hf_tome.is_patched(model)
    assert budgets["full"].tokens_per_layer == [65, 65, 65, 65]
    assert budgets["fast"].tokens_per_layer == [65, 61, 57, 53]
    assert budgets["dec"].config.inflect == -1.0
    assert budgets["half"].gmacs <= budgets["full"].gmacs / 2
    smaller_r = hf_tome.ToMeConfig(r=budgets["half"].config.r - 1)
    assert hf_tome.compute_report(hf_tome.apply(model, smaller_r)).gmacs > budgets["full"].gmacs / 2


def test_each_budget_carries_its_plan_and_leaves_the_model_as_it_was() -> None:
    model = hf_tome.apply(make_model("vit-cls"), r=3)
    default_plan = find_adapter(model).loop_module(model)._tome_plan
    budgets = parse_budgets(model, ["full=r:0", "fast=r:4", "dec=r:4,-1", "half=macs:0.5"])
    assert hf_tome.is_patched(model) and model.config.tome["r"] == 3  # still patched, with its own settings
    assert find_adapter(model).loop_module(model)._tome_plan is default_plan
    for budget in budgets.values():
        assert budget.plan == hf_tome.build_plan(model, budget.config)
        report = hf_tome.compute_report(model, plan=budget.plan)
        assert budget.tokens_per_layer == report.tokens_in and budget.gmacs == report.gmacs
    assert budgets["fast"].plan.layer_r == (4, 4, 4, 4)
    assert budgets["dec"].plan.layer_r == tuple(merge_schedule(4, 4, -1.0)) and budgets["dec"].plan.layer_r[0] == 8


@pytest.mark.parametrize("spec,message", [
    ("full", r"budget 'full' is invalid: expected 'name=spec'"),
    ("x=r:abc", r"budget spec 'r:abc' is invalid: expected 'r:<int>'"),
    ("x=macs:0", r"budget spec 'macs:0' is invalid"),
    ("x=flops:3", r"budget spec 'flops:3' is invalid"),
    ("x=macs:0.001", r"MACs reduction 1000.0x is out of reach"),
    # options
    ("x=r:4,mode=max", r"^budget spec 'r:4,mode=max' is invalid: mode='max', expected one of \['mean', 'mlerp'\]$"),
    ("x=r:4,rule=greedy", r"^budget spec 'r:4,rule=greedy' is invalid: rule='greedy', expected one of "
                          r"\['bipartite', 'pitome', 'agglomerative'\]$"),
    ("x=macs:0.5,speed=2", r"^budget spec 'macs:0.5,speed=2' is invalid: option 'speed' is unknown or given twice"),
    ("x=macs:0.5,mode=mlerp,mode=mean", r"option 'mode' is unknown or given twice"),
    ("x=r:4,decay=0.8", r"^budget spec 'r:4,decay=0.8' is invalid: expected 'r:<int>', 'r:<int>,<inflect>' or "
                        r"'macs:<fraction in \(0, 1\]>', then optionally ',mode=<mean\|mlerp>'"),
    ("x=macs:0.5,decay=1.5", r"^budget spec 'macs:0.5,decay=1.5' is invalid: expected"),
    ("x=macs:0.5,decay=abc", r"^budget spec 'macs:0.5,decay=abc' is invalid: expected"),
    ("x=macs:0.5,0.3", r"^budget spec 'macs:0.5,0.3' is invalid: expected"),
    ("x=macs:0.001,decay=0.8", r"^MACs target 0.001 is out of reach with decay=0.8"),
    ("x=macs:0.5,first=10", r"^budget spec 'macs:0.5,first=10' is invalid: expected .*',decay=<factor in \(0, 1\]>' "
                            r"and then ',first=<int >= 0>'$"),
    ("x=r:4,first=10", r"^budget spec 'r:4,first=10' is invalid: expected"),
    ("x=macs:0.5,decay=0.8,first=-2", r"^budget spec 'macs:0.5,decay=0.8,first=-2' is invalid: expected"),
    ("x=macs:0.5,decay=0.8,first=2.5", r"^budget spec 'macs:0.5,decay=0.8,first=2.5' is invalid: expected"),
    ("x=macs:0.001,decay=0.8,first=4", r"^MACs target 0.001 is out of reach with decay=0.8 and first=4"),
    ("x=r:4,prune=two", r"^budget spec 'r:4,prune=two' is invalid: expected .*',prune=<int >= 0>'"),
    ("x=r:4,prune=-1", r"^budget spec 'r:4,prune=-1' is invalid: expected"),
    ("x=r:4,prune=5", r"^ToMeConfig.prune_matched_layers=5 is invalid for ViTForImageClassification: it has 4 "
                      r"layers; expected at most 4$"),
])
def test_bad_budget_specs_name_the_value(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_budgets(make_model("vit-cls"), [spec])


def test_budget_options_set_the_merge_mode_rule_and_a_decaying_schedule() -> None:
    model = make_model("vit-cls")
    budgets = parse_budgets(model, ["soft=macs:0.5,decay=0.85,mode=mlerp", "odd=r:4,-1,rule=pitome,mode=mlerp",
                                    "flat=macs:0.5,mode=mlerp",
                                    "atc=macs:0.5,decay=0.85,rule=agglomerative,mode=mlerp"])
    soft, odd, flat = budgets["soft"], budgets["odd"], budgets["flat"]
    assert soft.config == hf_tome.ToMeConfig(r=decaying_r_for_macs(model, 0.5, 0.85), merge_mode="mlerp")
    assert soft.gmacs <= parse_budgets(model, ["full=r:0"])["full"].gmacs / 2
    assert soft.plan.layer_r[0] > soft.plan.layer_r[-1] and soft.plan.merge_mode == "mlerp"
    assert odd.config == hf_tome.ToMeConfig(r=4, inflect=-1.0, merge_rule="pitome", merge_mode="mlerp")
    assert odd.summary()["merge_rule"] == "pitome" and odd.summary()["merge_mode"] == "mlerp"
    assert soft.summary()["r"] == list(soft.config.r) and json.dumps(soft.summary())  # JSON-ready for /info
    assert flat.config == hf_tome.ToMeConfig(r=parse_budgets(model, ["h=macs:0.5"])["h"].config.r, merge_mode="mlerp")
    atc = budgets["atc"]
    assert atc.config == hf_tome.ToMeConfig(r=soft.config.r, merge_rule="agglomerative", merge_mode="mlerp")
    assert atc.plan.merge_for_layer(0).rule == "agglomerative" and atc.tokens_per_layer == soft.tokens_per_layer


def test_the_prune_option_sets_tofus_pruning_layers_on_the_plan() -> None:
    model = make_model("vit-cls")
    budgets = parse_budgets(model, ["tofu=macs:0.5,decay=0.85,mode=mlerp,prune=2", "plain=macs:0.5,decay=0.85"])
    tofu, plain = budgets["tofu"], budgets["plain"]
    assert tofu.config == hf_tome.ToMeConfig(r=decaying_r_for_macs(model, 0.5, 0.85), merge_mode="mlerp",
                                             prune_matched_layers=2)
    assert [tofu.plan.merge_for_layer(i).mode for i in range(4)] == ["prune", "prune", "mlerp", "mlerp"]
    assert tofu.tokens_per_layer == plain.tokens_per_layer and tofu.gmacs == plain.gmacs  # pruning moves no count
    assert tofu.summary()["prune_matched_layers"] == 2 and plain.summary()["prune_matched_layers"] == 0


def test_the_first_option_fixes_layer_0_of_a_decaying_schedule() -> None:
    model = make_model("vit-cls")
    budgets = parse_budgets(model, ["front=macs:0.5,decay=0.85,first=20,mode=mlerp", "plain=macs:0.5,decay=0.85"])
    front, plain = budgets["front"], budgets["plain"]
    assert front.config == hf_tome.ToMeConfig(r=decaying_r_for_macs(model, 0.5, 0.85, first=20), merge_mode="mlerp")
    assert front.plan.layer_r[0] == 20 != plain.plan.layer_r[0]
    assert front.gmacs <= parse_budgets(model, ["full=r:0"])["full"].gmacs / 2
    assert front.tokens_per_layer[1] == front.tokens_per_layer[0] - 20


def test_duplicate_budget_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"budget name 'a' is given twice"):
        parse_budgets(make_model("vit-cls"), ["a=r:0", "a=r:2"])
