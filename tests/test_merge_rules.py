"""PiToMe's and ATC's merge rules (``merge_rule="pitome"``, ``"agglomerative"``) and ToFu's MLERP
(``merge_mode="mlerp"``) beside ToMe's defaults.

The ops are checked on constructed tensors (the isolated token PiToMe protects, the norms MLERP keeps, the same
choice while a graph is captured); the options on tiny random ViT, DeiT, DINOv2 (with and without registers) and
AST models: ToMe's token counts, sizes and sources, protected tokens, r=0, batch invariance, eager against sdpa,
plans and save/load.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from conftest import main_output, make_model, mlp_norms, tokens_seen_by

import hf_tome
from hf_tome import ToMeConfig
from hf_tome.core.ops import (
    agglomerative_matching,
    bipartite_soft_matching,
    energy_scores,
    exportable,
    merge_weighted,
    pitome_margin,
    pitome_matching,
    unmerge,
)
from hf_tome.core.plan import LayerMerge
from hf_tome.core.reduce import reduce_tokens
from hf_tome.core.schedule import merge_schedule, tokens_per_layer
from hf_tome.integration.patch import tome_config_of

AST = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, num_labels=5,
           max_length=32, num_mel_bins=16, patch_size=4, frequency_stride=3, time_stride=4)  # 40 patches + 2
WHISPER = dict(vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=1,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
               max_source_positions=32, max_target_positions=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)


def _ast(attn_implementation: str = "sdpa") -> torch.nn.Module:
    config = T.ASTConfig(**AST)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return T.ASTForAudioClassification(config).eval()


# family -> (build with an attention implementation, input shape, tokens entering the model, protected tokens)
FAMILIES = {
    "vit": (lambda attn: make_model("vit-cls", attn), (3, 32, 32), 65, 1),
    "deit": (lambda attn: make_model("deit-cls", attn), (3, 32, 32), 66, 2),
    "dinov2": (lambda attn: make_model("dinov2-cls", attn), (3, 32, 32), 65, 1),
    "dinov2-reg": (lambda attn: make_model("dinov2-reg-cls", attn), (3, 32, 32), 68, 4),
    "ast": (_ast, (32, 16), 42, 2),
}
# (merge_rule, merge_mode): every combination but ToMe's own
OPTIONS = [("pitome", "mean"), ("bipartite", "mlerp"), ("pitome", "mlerp"), ("agglomerative", "mean"),
           ("agglomerative", "mlerp")]
OPTION_IDS = [f"{rule}-{mode}" for rule, mode in OPTIONS]
R = 8


def _build(family: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    return FAMILIES[family][0](attn_implementation)


def _inputs(family: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, *FAMILIES[family][1])


def _run(model: torch.nn.Module, x: torch.Tensor, **kwargs):
    """The model's output for ``x`` (pixels, or a spectrogram for AST), without gradients."""
    key = "input_values" if x.dim() == 3 else "pixel_values"
    with torch.no_grad():
        return model(**{key: x}, **kwargs)


def _encoder_output(model: torch.nn.Module, x: torch.Tensor):
    """The base model's output: hidden states with ``token_sizes``, ``token_positions`` and ``token_source``."""
    return _run(model.base_model, x)


# The ops.

def test_pitome_margin_falls_from_0_9_to_0_with_depth():
    assert pitome_margin(0, 12) == pytest.approx(0.9)
    assert pitome_margin(6, 12) == pytest.approx(0.45)
    assert pitome_margin(12, 12) == 0.0 and pitome_margin(20, 12) == 0.0


def _clustered_metric() -> torch.Tensor:
    """[2, 10, 8]: a class token, eight tokens in one tight cluster, and token 9 pointing away from all of them."""
    torch.manual_seed(0)
    base = torch.zeros(8)
    base[0] = 1.0
    cluster = base + 0.05 * torch.randn(2, 8, 8)
    isolated = torch.zeros(2, 1, 8)
    isolated[..., 1] = 1.0
    class_token = torch.randn(2, 1, 8)
    return torch.cat([class_token, cluster, isolated], dim=1)


def test_pitome_keeps_the_lowest_energy_token_unmerged():
    metric = _clustered_metric()
    energy = energy_scores(metric, margin=0.5)
    assert (energy[:, 1:].argmin(dim=1) + 1).tolist() == [9, 9]  # the isolated token is the least redundant
    for r in (1, 3):
        step = pitome_matching(metric, r, protected=1, margin=0.5)
        assert step.num_kept == 10 - r and step.merged.shape[1] == r
        assert not (step.merged == 9).any() and not (step.merged == 0).any()
        assert (step.kept == 9).any(dim=1).all() and (step.kept[:, 0] == 0).all()
        # it absorbs nothing either: its value and size come out untouched
        x, size = torch.randn(2, 10, 5), torch.ones(2, 10, 1)
        merged, merged_size = merge_weighted(step, x, size)
        slot = (step.kept == 9).float().argmax(dim=1)
        for b in range(2):
            assert torch.equal(merged[b, slot[b]], x[b, 9]) and merged_size[b, slot[b], 0] == 1
        assert torch.equal(merged[:, 0], x[:, 0])


def test_pitome_merges_the_highest_energy_tokens_alternately_a_into_b():
    torch.manual_seed(3)
    metric = torch.randn(3, 17, 6)
    r, protected = 4, 1
    step = pitome_matching(metric, r, protected, margin=0.3)
    energy = energy_scores(metric, 0.3)
    energy[:, :protected] = -torch.inf
    order = energy.argsort(dim=1, descending=True, stable=True)
    assert torch.equal(step.merged, order[:, 0:2 * r:2])  # set A: 1st, 3rd, ... highest energy
    # every A token goes into its most similar B token (2nd, 4th, ...)
    set_b = order[:, 1:2 * r:2]
    unit = torch.nn.functional.normalize(metric, dim=-1)
    for b in range(3):
        best = set_b[b][(unit[b, step.merged[b]] @ unit[b, set_b[b]].T).argmax(dim=1)]
        assert torch.equal(step.kept[b, step.merged_into[b]], best)
    # the survivors keep their original order
    assert torch.equal(step.kept, step.kept.sort(dim=1).values)


def test_pitome_checks_r_like_bipartite_matching():
    with pytest.raises(ValueError, match=r"r=9 is out of range: expected 0 <= r <= \(N - protected\) // 2 = 8"):
        pitome_matching(torch.randn(1, 17, 4), 9, protected=1)


def test_pitome_chooses_the_same_tokens_while_a_graph_is_captured(monkeypatch):
    metric = torch.randn(3, 33, 8)
    metric[:, 10] = metric[:, 12]  # a tie
    eager = pitome_matching(metric, 8, protected=2, margin=0.4)
    monkeypatch.setattr(exportable, "capturing_graph", lambda: True)
    captured = pitome_matching(metric, 8, protected=2, margin=0.4)
    for name in ("kept", "merged", "merged_into"):
        assert torch.equal(getattr(captured, name), getattr(eager, name))


@pytest.mark.parametrize("rule", ["bipartite", "pitome", "agglomerative"])
def test_mlerp_merged_norm_is_the_size_weighted_mean_of_the_members_norms(rule):
    torch.manual_seed(0)
    metric, x = torch.randn(2, 21, 8), torch.randn(2, 21, 16) * torch.rand(2, 21, 1) * 5
    size = torch.randint(1, 5, (2, 21, 1)).float()
    match = {"bipartite": bipartite_soft_matching, "pitome": pitome_matching, "agglomerative": agglomerative_matching}
    step = match[rule](metric, 6, 1)
    mean, mean_size = merge_weighted(step, x, size)
    mlerp, mlerp_size = merge_weighted(step, x, size, "mlerp")
    assert torch.equal(mlerp_size, mean_size)  # sizes keep their sum bookkeeping
    expected_norm = step.merge(x.norm(dim=-1, keepdim=True) * size) / mean_size
    torch.testing.assert_close(mlerp.norm(dim=-1, keepdim=True), expected_norm, atol=1e-5, rtol=1e-5)
    # same direction as the mean, and never longer than the members on average (the mean shrinks instead)
    cosine = torch.nn.functional.cosine_similarity(mlerp, mean, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    assert (mean.norm(dim=-1, keepdim=True) <= expected_norm + 1e-5).all()
    torch.testing.assert_close(mlerp[:, 0], x[:, 0])  # the protected token is untouched


def test_mlerp_of_members_that_cancel_out_is_zero_not_nan():
    step = bipartite_soft_matching(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), 1, protected=0)
    x = torch.tensor([[[1.0, 2.0], [-1.0, -2.0]]], requires_grad=True)
    merged, size = merge_weighted(step, x, torch.ones(1, 2, 1), "mlerp")
    assert torch.equal(merged.detach(), torch.zeros(1, 1, 2)) and size.item() == 2
    merged.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_merge_weighted_refuses_an_unknown_mode():
    step = bipartite_soft_matching(torch.randn(1, 5, 4), 2, protected=1)
    with pytest.raises(ValueError, match=r"merge mode 'max' is invalid: expected one of \('mean', 'mlerp', 'prune'\)"):
        merge_weighted(step, torch.randn(1, 5, 3), torch.ones(1, 5, 1), "max")


def test_reduce_tokens_tracks_sizes_positions_and_sources_under_pitome():
    torch.manual_seed(0)
    hidden, metric = torch.randn(2, 17, 6), torch.randn(2, 17, 4)
    merge = LayerMerge("pitome", "mlerp", 0.6)
    out, size, positions, source = reduce_tokens(hidden, metric, None, None, None, 5, 1, True, merge)
    assert out.shape == (2, 12, 6) and size.sum(dim=1).flatten().tolist() == [17.0, 17.0]
    assert torch.equal(source.sum(dim=-1, keepdim=True), size)  # every token holds exactly its size
    # positions and sources agree: original token j is held by token positions[j], whose source row has j
    assert (source.gather(1, positions[..., None].expand(-1, -1, 17)).diagonal(dim1=1, dim2=2) == 1).all()
    assert unmerge(out, positions).shape == (2, 17, 6)


# The options on models.

@pytest.mark.parametrize("option", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_counts_sizes_and_protected_tokens(family, option):
    rule, mode = option
    _, _, total, protected = FAMILIES[family]
    model = hf_tome.apply(_build(family), r=R, merge_rule=rule, merge_mode=mode, trace_source=True)
    x = _inputs(family)
    expected = tokens_per_layer(total, merge_schedule(R, 4), protected)
    assert tokens_seen_by(mlp_norms(model), lambda: _run(model, x)) == expected[1:]  # ToMe's counts
    output = _encoder_output(model, x)
    sizes, source = output.token_sizes, output.token_source
    assert sizes.shape == (2, expected[-1], 1)
    assert sizes.sum(dim=1).flatten().tolist() == [float(total)] * 2
    assert torch.equal(source.sum(dim=-1, keepdim=True), sizes)
    # the protected tokens stay at the front, each holding only itself
    assert torch.equal(source[:, :protected], torch.eye(protected, total).expand(2, -1, -1))
    positions = output.token_positions
    assert torch.equal(positions[:, :protected], torch.arange(protected).expand(2, -1))
    # unmerge (the dense / saliency path): every original token goes back to the token whose source holds it
    assert (source.gather(1, positions[..., None].expand(-1, -1, total)).diagonal(dim1=1, dim2=2) == 1).all()
    assert unmerge(output.last_hidden_state, positions).shape == (2, total, output.last_hidden_state.shape[-1])


@pytest.mark.parametrize("option", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_r0_equals_stock_exactly(family, option):
    rule, mode = option
    stock = _build(family)
    patched = hf_tome.apply(copy.deepcopy(stock), r=0, merge_rule=rule, merge_mode=mode)
    x = _inputs(family)
    assert torch.equal(main_output(_run(patched, x)), main_output(_run(stock, x)))


@pytest.mark.parametrize("option", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_options_change_the_outputs_but_not_with_batch_or_attention_kernel(family, option):
    rule, mode = option
    x = _inputs(family, batch=3)
    sdpa = hf_tome.apply(_build(family), r=R, merge_rule=rule, merge_mode=mode)
    eager = hf_tome.apply(_build(family, "eager"), r=R, merge_rule=rule, merge_mode=mode)
    batched = main_output(_run(sdpa, x))
    alone = main_output(_run(sdpa, x[1:2]))
    torch.testing.assert_close(alone, batched[1:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(main_output(_run(eager, x)), batched, atol=1e-5, rtol=0)
    tome = main_output(_run(hf_tome.apply(_build(family), r=R), x))
    assert (tome - batched).abs().max() > 1e-4  # the option is really used


@pytest.mark.parametrize("option", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("family", ["vit", "deit", "dinov2", "ast"])
def test_plan_round_trip_equals_apply(family, option):
    rule, mode = option
    config = ToMeConfig(r=(R, -0.5), merge_rule=rule, merge_mode=mode)
    model = hf_tome.apply(_build(family), r=2)  # its own plan differs from the one handed to the call
    plan = hf_tome.build_plan(model, config)
    assert (plan.merge_rule, plan.merge_mode) == (rule, mode)
    assert plan.merge_for_layer(3) == LayerMerge(rule, mode, pitome_margin(3, 4))
    applied = hf_tome.apply(copy.deepcopy(model), config)
    x = _inputs(family)
    torch.testing.assert_close(main_output(_run(model, x, tome_plan=plan)), main_output(_run(applied, x)),
                               atol=0, rtol=0)
    assert hf_tome.build_plan(model, r=R).merge_for_layer(0) is None  # ToMe's defaults hand layers nothing


@pytest.mark.parametrize("rule", ["pitome", "agglomerative"])
def test_save_and_load_keep_the_options(tmp_path, rule):
    model = hf_tome.apply(_build("vit"), r=R, merge_rule=rule, merge_mode="mlerp")
    model.save_pretrained(tmp_path)
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    config = tome_config_of(loaded)
    assert (config.merge_rule, config.merge_mode, config.r) == (rule, "mlerp", R)
    x = _inputs("vit")
    torch.testing.assert_close(main_output(_run(loaded, x)), main_output(_run(model, x)), atol=0, rtol=0)
    overridden = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path, tome_merge_mode="mean")
    assert tome_config_of(overridden).merge_mode == "mean"
    restored = ToMeConfig.from_json_string(ToMeConfig(merge_rule=rule, merge_mode="mlerp").to_json_string())
    assert (restored.merge_rule, restored.merge_mode) == (rule, "mlerp")
    assert (ToMeConfig().merge_rule, ToMeConfig().merge_mode) == ("bipartite", "mean")  # ToMe's defaults


@pytest.mark.filterwarnings("ignore:.*saved without remote code")
def test_save_and_load_keep_the_options_on_ast(tmp_path):
    model = hf_tome.apply(_build("ast"), r=R, merge_rule="pitome")
    model.save_pretrained(tmp_path)
    loaded = hf_tome.AutoModelForAudioClassification.from_pretrained(tmp_path).eval()
    assert tome_config_of(loaded).merge_rule == "pitome"
    x = _inputs("ast")
    torch.testing.assert_close(main_output(_run(loaded, x)), main_output(_run(model, x)), atol=0, rtol=0)


@pytest.mark.parametrize("field, value, allowed", [
    ("merge_rule", "tome", "'bipartite' or 'pitome' or 'agglomerative'"),
    ("merge_mode", "slerp", "'mean' or 'mlerp'"),
    ("merge_mode", None, "'mean' or 'mlerp'"),
])
def test_a_bad_value_names_the_field_and_the_allowed_ones(field, value, allowed):
    message = f"ToMeConfig.{field}={value!r} is invalid: expected {allowed}"
    with pytest.raises(ValueError) as raised:
        ToMeConfig(**{field: value})
    assert str(raised.value) == message
    with pytest.raises(ValueError) as raised:
        hf_tome.apply(_build("vit"), **{field: value})
    assert str(raised.value) == message


def test_prune_merge_takes_the_options_with_the_configured_counts():
    prune_kept, merge_kept = [65, 50, 40, 30], [65, 44, 30, 20]
    x = _inputs("vit")
    for match in ("class_attention", "bipartite"):
        model = hf_tome.apply(_build("vit"), prune_kept=prune_kept, merge_kept=merge_kept, merge_match=match,
                              merge_rule="pitome", merge_mode="mlerp")
        assert tokens_seen_by(mlp_norms(model), lambda m=model: _run(m, x)) == merge_kept
        mean = hf_tome.apply(_build("vit"), prune_kept=prune_kept, merge_kept=merge_kept, merge_match=match)
        assert (main_output(_run(model, x)) - main_output(_run(mean, x))).abs().max() > 1e-4


def test_merging_with_the_options_trains():
    model = hf_tome.apply(_build("vit"), r=R, merge_rule="pitome", merge_mode="mlerp").train()
    loss = model(pixel_values=_inputs("vit"), labels=torch.tensor([0, 3])).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("field, value, default", [("merge_mode", "mlerp", "'mean'"),
                                                   ("prune_matched_layers", 1, "0")])
def test_families_whose_layers_take_no_merge_options_refuse_them(field, value, default):
    config = T.SwinConfig(image_size=32, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=4,
                          num_labels=3)
    torch.manual_seed(0)
    model = T.SwinForImageClassification(config).eval()
    with pytest.raises(ValueError) as raised:
        hf_tome.apply(model, r=2, **{field: value})
    assert str(raised.value) == (
        f"ToMeConfig.{field}={value!r} is invalid for SwinForImageClassification: the swin adapter's layers "
        f"do not take merge rules or modes (no tome_merge keyword); expected {field}={default}")
    assert not hf_tome.is_patched(model)  # refused before anything changed
    hf_tome.apply(model, r=2)  # ToMe's defaults still work


def _whisper_encoder_output(model, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model.encoder(input_features=features).last_hidden_state


def _videomae() -> torch.nn.Module:
    config = T.VideoMAEConfig(image_size=16, patch_size=4, num_channels=3, num_frames=4, tubelet_size=2,
                              hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              num_labels=3, use_mean_pooling=True)
    torch.manual_seed(0)
    return T.VideoMAEForVideoClassification(config).eval()


@pytest.mark.parametrize("family", ["whisper", "videomae"])
@pytest.mark.parametrize("rule,mode", [("pitome", "mean"), ("bipartite", "mlerp"), ("pitome", "mlerp"),
                                       ("agglomerative", "mlerp")])
def test_whisper_encoder_and_videomae_take_the_options_with_tomes_token_counts(family: str, rule: str,
                                                                               mode: str) -> None:
    torch.manual_seed(3)
    if family == "whisper":
        model = T.WhisperForConditionalGeneration(T.WhisperConfig(**WHISPER)).eval()
        inputs = torch.randn(2, WHISPER["num_mel_bins"], 2 * WHISPER["max_source_positions"])

        def output(m):
            return _whisper_encoder_output(m, inputs)
    else:
        model = _videomae()
        inputs = torch.randn(2, 4, 3, 16, 16)

        def output(m):
            with torch.no_grad():
                return m(pixel_values=inputs).logits
    stock = output(model)
    assert torch.equal(output(hf_tome.apply(model, r=0, merge_rule=rule, merge_mode=mode)), stock)
    tome_tokens = hf_tome.compute_report(hf_tome.apply(model, r=3)).tokens_in
    tome = output(model)
    hf_tome.apply(model, r=3, merge_rule=rule, merge_mode=mode)
    assert hf_tome.compute_report(model).tokens_in == tome_tokens
    merged = output(model)
    assert merged.shape == tome.shape and torch.isfinite(merged).all()
    assert not torch.allclose(merged, tome, atol=1e-6)  # the options reached the layers
