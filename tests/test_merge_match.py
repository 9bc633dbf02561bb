"""Unified compression with ``merge_match="bipartite"``: prune by class attention, then ToMe's bipartite matching."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_MODELS, main_output, make_model, mlp_norms, tokens_seen_by

import hf_tome
from hf_tome.core.schedule import tokens_per_layer
from hf_tome.integration.budget_table import FULL_GFLOPS_KEY

ALL = list(IMAGE_MODELS)
NUM_PATCHES = 64


def _tokens_reaching_each_mlp(model, pixels) -> list[int]:
    return tokens_seen_by(mlp_norms(model), lambda: model(pixels))


@pytest.mark.parametrize("name", ALL)
def test_bipartite_without_pruning_is_tome_with_block0_left_alone(name, pixels):
    protected = IMAGE_MODELS[name][3]
    total = NUM_PATCHES + protected
    schedule = [0, 12, 9, 7]
    tokens = tokens_per_layer(total, schedule, protected)
    tome = hf_tome.apply(make_model(name), r=schedule)
    kept = hf_tome.apply(make_model(name), prune_kept=tokens[:-1], merge_kept=tokens[1:], merge_match="bipartite")
    with torch.no_grad():
        expected, got = tome(pixels), kept(pixels)
    torch.testing.assert_close(main_output(got), main_output(expected), atol=1e-6, rtol=0)
    assert _tokens_reaching_each_mlp(kept, pixels) == tokens[1:]
    assert hf_tome.compute_report(kept).gmacs == pytest.approx(hf_tome.compute_report(tome).gmacs)


@pytest.mark.parametrize("name", ALL)
def test_bipartite_counts_per_layer_match_the_config(name, pixels):
    protected = IMAGE_MODELS[name][3]
    total = NUM_PATCHES + protected
    prune_kept = [total, 50 + protected, 40 + protected, 28 + protected]
    merge_kept = [total, 44 + protected, 30 + protected, 20 + protected]
    model = hf_tome.apply(make_model(name), prune_kept=prune_kept, merge_kept=merge_kept, merge_match="bipartite")
    assert _tokens_reaching_each_mlp(model, pixels) == merge_kept
    assert hf_tome.compute_report(model).tokens_out == merge_kept


@pytest.mark.parametrize("name", ["vit-cls", "deit-cls", "dinov2-reg-cls"])
def test_bipartite_merges_only_the_survivors_of_class_attention_pruning(name, pixels):
    protected = IMAGE_MODELS[name][3]
    total = NUM_PATCHES + protected
    eager = make_model(name, "eager")
    with torch.no_grad():
        attention = eager(pixels, output_attentions=True).attentions[1]  # block 1 sees block 0's output
    class_row = attention[:, :, 0, protected:].mean(1)
    survivors = 40
    model = make_model(name)
    # Only block 1 compresses: prune to 40 by class attention, then bipartite matching merges 40 down to 30.
    hf_tome.apply(model, prune_kept=[total, survivors, 30, 30], merge_kept=[total, 30, 30, 30],
                  merge_match="bipartite", trace_source=True)
    with torch.no_grad():
        out = model.base_model(pixels)
    assert torch.equal(out.token_sizes.sum(1).flatten(), torch.full((len(pixels),), float(survivors)))
    assert torch.equal(out.token_source.sum(-1, keepdim=True), out.token_sizes)
    assert torch.equal(out.token_sizes[:, :protected], torch.ones(len(pixels), protected, 1))
    held = out.token_source.sum(1)
    for image in range(len(pixels)):
        top = (class_row[image].topk(survivors - protected).indices + protected).tolist()
        assert held[image].nonzero().flatten().tolist() == sorted([*range(protected), *top])


@pytest.mark.parametrize("name", ["vit-cls", "deit-teacher", "dinov2-reg-cls"])
def test_bipartite_eager_equals_sdpa_and_batch_invariance(name, pixels):
    protected = IMAGE_MODELS[name][3]
    total = NUM_PATCHES + protected
    settings = {"prune_kept": [total, 56, 40, 33], "merge_kept": [total, 44, 33, 24], "merge_match": "bipartite"}
    eager = hf_tome.apply(make_model(name, "eager"), **settings)
    sdpa = hf_tome.apply(make_model(name, "sdpa"), **settings)
    with torch.no_grad():
        batched = main_output(sdpa(pixels))
        torch.testing.assert_close(main_output(eager(pixels)), batched, atol=1e-5, rtol=0)
        for image in range(len(pixels)):
            torch.testing.assert_close(main_output(sdpa(pixels[image : image + 1])), batched[image : image + 1],
                                       atol=1e-5, rtol=0)


def test_bipartite_counts_out_of_reach_raise_naming_the_layer_and_the_bound():
    model = make_model("vit-cls")
    with pytest.raises(ValueError, match=r"ToMeConfig.merge_kept=\[65, 10, 10, 10\] is invalid with "
                                         r"merge_match='bipartite': layer 1 would merge 40 tokens down to 10, but one "
                                         r"bipartite step merges at most half of the 39 unprotected ones; expected "
                                         r"merge_kept\[1\] >= 21"):
        hf_tome.apply(model, prune_kept=[65, 40, 10, 10], merge_kept=[65, 10, 10, 10], merge_match="bipartite")
    assert not hf_tome.is_patched(model)
    # The same counts are fine for the class-attention rule, which can merge any number of tokens.
    hf_tome.apply(model, prune_kept=[65, 40, 10, 10], merge_kept=[65, 10, 10, 10])


def test_bad_merge_match_raises():
    with pytest.raises(ValueError, match=r"ToMeConfig.merge_match='greedy' is invalid: expected 'class_attention' "
                                         r"or 'bipartite'"):
        hf_tome.ToMeConfig(merge_match="greedy")
    with pytest.raises(ValueError, match=r"ToMeConfig.budget_table=.* is invalid: expected .*'merge_match'"):
        hf_tome.ToMeConfig(budget_table=[{"gflops": 1.0, "prune_kept": [65], "merge_kept": [65],
                                          "merge_match": "greedy"}])


def test_budget_rows_carry_their_merge_match_through_save_and_load(tmp_path, pixels):
    model = make_model("vit-cls")
    full = hf_tome.compute_report(model).gmacs
    tokens = tokens_per_layer(65, [0, 12, 9, 7], 1)
    bipartite_row = {"prune_kept": tokens[:-1], "merge_kept": tokens[1:], "merge_match": "bipartite"}
    table = [{"gflops": full, "prune_kept": [65] * 4, "merge_kept": [65] * 4, "accuracy": 0.9},
             {"gflops": 0.0, "accuracy": 0.85, **bipartite_row},
             {"gflops": 0.0, "prune_kept": [65, 30, 20, 15], "merge_kept": [65, 25, 15, 10], "accuracy": 0.8}]
    for row in table[1:]:
        row["gflops"] = hf_tome.compute_report(hf_tome.apply(make_model("vit-cls"), **{
            key: row[key] for key in ("prune_kept", "merge_kept", "merge_match") if key in row})).gmacs
    hf_tome.apply(model, budget_table=table, extra={FULL_GFLOPS_KEY: full})
    model.save_pretrained(tmp_path)
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path, tome_budget=table[1]["gflops"] / full)
    assert loaded.tome_config.merge_match == "bipartite" and loaded.tome_config.merge_kept == tokens[1:]
    tome = hf_tome.apply(make_model("vit-cls"), r=[0, 12, 9, 7])
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, tome(pixels).logits, atol=1e-6, rtol=0)
    loaded.set_tome_budget(table[2]["gflops"] / full)  # a row without the key uses class attention
    assert loaded.tome_config.merge_match == "class_attention"
    assert _tokens_reaching_each_mlp(loaded, pixels) == [65, 25, 15, 10]


def test_bipartite_candidates_stay_within_reach_and_match_their_gmacs():
    from hf_tome.budgets.search_space import SearchSpace, sample_candidates
    from hf_tome.integration.registry import find_adapter

    model = make_model("deit-cls", num_hidden_layers=8)  # enough layers for 40 distinct candidates
    space = SearchSpace.for_shape(find_adapter(model).encoder_shape(model, None))
    targets = [0.7 * space.full_gmacs, 0.5 * space.full_gmacs]
    candidates = sample_candidates(space, targets, 40, seed=2, merge_matches=["bipartite"])
    assert len(candidates) == 40 and {c.merge_match for c in candidates} == {"bipartite"}
    for candidate in candidates:
        assert 0.95 * targets[candidate.target] <= candidate.gmacs <= targets[candidate.target]
        patched = hf_tome.apply(model, prune_kept=list(candidate.prune_kept), merge_kept=list(candidate.merge_kept),
                                merge_match="bipartite")  # raises if a layer merges more than it can
        assert hf_tome.compute_report(patched).gmacs == pytest.approx(candidate.gmacs)
    with pytest.raises(ValueError, match=r"merge_matches=\['greedy'\] is invalid: expected one or more of "):
        sample_candidates(space, targets, 4, merge_matches=["greedy"])
