"""ToFu's pruning in the first layers (``ToMeConfig.prune_matched_layers``): the matched token is dropped and its
partner keeps its own hidden state, while sizes and sources still add up; later layers merge with ``merge_mode``.

The op is checked on constructed tensors (bipartite, PiToMe and prune + merge steps); the option on tiny random
ViT, DeiT, DINOv2 and AST models: ToMe's token counts, sizes, r=0, batch invariance, eager against sdpa, the
per-layer modes of a plan, save/load and the refusals (Swin's is in test_merge_rules.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import main_output, make_model, mlp_norms, tokens_seen_by
from test_merge_rules import FAMILIES, _build, _encoder_output, _inputs, _run

import hf_tome
from hf_tome import ToMeConfig
from hf_tome.core.ops import (
    agglomerative_matching,
    bipartite_soft_matching,
    merge_weighted,
    pitome_margin,
    pitome_matching,
)
from hf_tome.core.ops.pruning import prune_and_merge
from hf_tome.core.plan import LayerMerge
from hf_tome.core.schedule import merge_schedule, tokens_per_layer
from hf_tome.integration.patch import tome_config_of

R = 8


# The op.

def _steps(metric: torch.Tensor):
    """One step of each kind on ``metric`` [1, 9, D]: bipartite, PiToMe, ATC and prune + merge by class attention."""
    class_scores = torch.arange(9.0).flip(0)[None]  # token 0 ranks first
    return {"bipartite": bipartite_soft_matching(metric, 3, protected=1),
            "pitome": pitome_matching(metric, 3, protected=1, margin=0.5),
            "agglomerative": agglomerative_matching(metric, 3, protected=1),
            "prune_merge": prune_and_merge(class_scores, metric, prune_kept=7, merge_kept=5, protected=1)}


@pytest.mark.parametrize("kind", ["bipartite", "pitome", "agglomerative", "prune_merge"])
def test_prune_keeps_every_output_token_as_it_was_and_adds_the_sizes(kind):
    torch.manual_seed(0)
    metric = torch.randn(1, 9, 4)
    x = torch.arange(9.0)[None, :, None] * torch.ones(1, 9, 3)  # row i holds the value i
    size = torch.tensor([1.0, 2, 1, 1, 3, 1, 1, 2, 1])[None, :, None]
    step = _steps(metric)[kind]
    pruned, pruned_size = merge_weighted(step, x, size, "prune")
    mean, mean_size = merge_weighted(step, x, size, "mean")
    assert torch.equal(pruned_size, mean_size)  # sizes add up exactly as when merging
    expected_tokens = 6 if kind != "prune_merge" else 5
    assert pruned.shape == (1, expected_tokens, 3)
    if kind != "prune_merge":  # nothing is pruned by class attention here: every size is still counted
        assert pruned_size.sum().item() == size.sum().item()
    # every output row is one input row, unchanged, and the protected token stays first
    kept = pruned[0, :, 0].long()
    assert torch.equal(pruned, x[:, kept])
    assert kept[0].item() == 0 and len(set(kept.tolist())) == expected_tokens
    # the mean differs wherever a token absorbed another, prune never does
    grown = (pruned_size[0, :, 0] > size[0, kept, 0])
    assert grown.any() and not torch.equal(mean[0, grown], pruned[0, grown])
    assert torch.equal(mean[0, ~grown], pruned[0, ~grown])


def test_prune_keeps_the_dtype_and_counts_every_size():
    metric = torch.randn(2, 9, 4)
    x = torch.randn(2, 9, 6, dtype=torch.bfloat16)
    step = bipartite_soft_matching(metric, 4, protected=1)
    pruned, size = merge_weighted(step, x, torch.ones(2, 9, 1), "prune")
    assert pruned.dtype == torch.bfloat16 and size.dtype == torch.float32
    assert pruned.shape == (2, 5, 6) and size.sum(dim=1).flatten().tolist() == [9.0, 9.0]
    assert torch.equal(pruned, step.own_rows(x))


# The option on models.

@pytest.mark.parametrize("family", ["vit", "deit", "dinov2", "ast"])
def test_token_counts_and_sizes_are_tomes(family):
    _, _, total, protected = FAMILIES[family]
    model = hf_tome.apply(_build(family), r=R, merge_mode="mlerp", prune_matched_layers=2, trace_source=True)
    x = _inputs(family)
    expected = tokens_per_layer(total, merge_schedule(R, 4), protected)
    assert tokens_seen_by(mlp_norms(model), lambda: _run(model, x)) == expected[1:]
    output = _encoder_output(model, x)
    assert output.token_sizes.sum(dim=1).flatten().tolist() == [float(total)] * 2
    assert torch.equal(output.token_source.sum(dim=-1, keepdim=True), output.token_sizes)


@pytest.mark.parametrize("family", ["vit", "dinov2", "ast"])
def test_r0_equals_stock_and_the_outputs_hold_across_batch_and_kernel(family):
    stock = _build(family)
    x = _inputs(family, batch=3)
    r0 = hf_tome.apply(copy.deepcopy(stock), r=0, prune_matched_layers=4)
    assert torch.equal(main_output(_run(r0, x)), main_output(_run(stock, x)))
    sdpa = hf_tome.apply(_build(family), r=R, merge_mode="mlerp", prune_matched_layers=2)
    eager = hf_tome.apply(_build(family, "eager"), r=R, merge_mode="mlerp", prune_matched_layers=2)
    batched = main_output(_run(sdpa, x))
    torch.testing.assert_close(main_output(_run(sdpa, x[1:2])), batched[1:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(main_output(_run(eager, x)), batched, atol=1e-5, rtol=0)
    merged = main_output(_run(hf_tome.apply(_build(family), r=R, merge_mode="mlerp"), x))
    assert (merged - batched).abs().max() > 1e-4  # the pruning layers really ran


def test_the_plan_prunes_in_the_first_layers_then_uses_the_merge_mode():
    model = make_model("vit-cls")
    plan = hf_tome.build_plan(model, r=R, prune_matched_layers=2)
    assert [plan.merge_for_layer(i) for i in range(4)] == [
        LayerMerge("bipartite", "prune", pitome_margin(0, 4)), LayerMerge("bipartite", "prune", pitome_margin(1, 4)),
        None, None]  # ToMe's mean after them: layers are handed nothing
    plan = hf_tome.build_plan(model, r=R, merge_rule="pitome", merge_mode="mlerp", prune_matched_layers=1)
    assert [plan.merge_for_layer(i).mode for i in range(4)] == ["prune", "mlerp", "mlerp", "mlerp"]
    assert [plan.merge_for_layer(i).rule for i in range(4)] == ["pitome"] * 4
    x = _inputs("vit")
    applied = hf_tome.apply(copy.deepcopy(model), r=R, merge_rule="pitome", merge_mode="mlerp",
                            prune_matched_layers=1)
    torch.testing.assert_close(main_output(_run(hf_tome.apply(model, r=2), x, tome_plan=plan)),
                               main_output(_run(applied, x)), atol=0, rtol=0)


def test_a_pruning_layer_hands_its_mlp_the_stock_hidden_states_of_the_survivors():
    """Layer 0 attends over all tokens exactly as the stock model does; pruning then keeps some of those hidden
    states unchanged, where a merge would have averaged them."""
    x = _inputs("vit")
    stock_seen, seen = [], []
    stock = make_model("vit-cls")
    first_norm = mlp_norms(stock)[0]
    hook = first_norm.register_forward_pre_hook(lambda module, args: stock_seen.append(args[0]))
    _run(stock, x)
    hook.remove()
    for mode in ("prune", "mean"):
        model = hf_tome.apply(make_model("vit-cls"), r=R, prune_matched_layers=1 if mode == "prune" else 0)
        hook = mlp_norms(model)[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        _run(model, x)
        hook.remove()
    pruned, merged, full = seen[0], seen[1], stock_seen[0]
    assert pruned.shape == merged.shape == (2, 65 - R, 32) and full.shape == (2, 65, 32)
    # distance from each row to its nearest stock row: 0 for every pruned survivor, not for the merged tokens
    def nearest(rows):
        return (rows[:, :, None] - full[:, None]).abs().amax(dim=-1).amin(dim=-1)

    assert nearest(pruned).max().item() == 0.0
    averaged = (nearest(merged) > 1e-3).sum(dim=1)  # tokens that absorbed others: at most r per image
    assert ((averaged >= 1) & (averaged <= R)).all()
    assert torch.equal(pruned[:, 0], full[:, 0])  # the class token first


def test_save_and_load_keep_the_option(tmp_path):
    model = hf_tome.apply(_build("vit"), r=R, merge_mode="mlerp", prune_matched_layers=3)
    model.save_pretrained(tmp_path)
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert tome_config_of(loaded).prune_matched_layers == 3
    x = _inputs("vit")
    torch.testing.assert_close(main_output(_run(loaded, x)), main_output(_run(model, x)), atol=0, rtol=0)
    overridden = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path, tome_prune_matched_layers=0)
    assert tome_config_of(overridden).prune_matched_layers == 0
    assert ToMeConfig.from_json_string(ToMeConfig(prune_matched_layers=2).to_json_string()).prune_matched_layers == 2
    assert ToMeConfig().prune_matched_layers == 0  # ToMe's default: merge everywhere


@pytest.mark.parametrize("value", [-1, 1.5, True, "2", None])
def test_a_bad_count_names_the_field_and_what_is_allowed(value):
    message = f"ToMeConfig.prune_matched_layers={value!r} is invalid: expected an int >= 0 (layers from the first)"
    with pytest.raises(ValueError) as raised:
        ToMeConfig(prune_matched_layers=value)
    assert str(raised.value) == message


def test_more_layers_than_the_model_has_are_refused():
    model = make_model("vit-cls")
    with pytest.raises(ValueError) as raised:
        hf_tome.apply(model, r=2, prune_matched_layers=5)
    assert str(raised.value) == ("ToMeConfig.prune_matched_layers=5 is invalid for ViTForImageClassification: it has "
                                 "4 layers; expected at most 4")
    assert not hf_tome.is_patched(model)
    hf_tome.apply(model, r=2, prune_matched_layers=4)  # every layer is allowed

