"""Token merging inside Swin's attention windows, on tiny random Swin configs."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from conftest import main_output

import hf_tome
from hf_tome.adapters.swin import group_members, match_windows, merged_window_bias, window_labels

# 32 px / patch 2 -> 16 x 16 grid, 16 windows of 4 x 4; stage 2: 8 x 8 grid, 4 windows. Both stages shift.
TINY_SWIN = dict(image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                 window_size=4, mlp_ratio=2.0, num_labels=5)
WINDOW_TOKENS = 16
WINDOWS_PER_STAGE = [16, 4]
CLASSES = {"swin": T.SwinModel, "swin-cls": T.SwinForImageClassification}


def make_swin(name: str = "swin-cls", attn_implementation: str = "sdpa", **overrides) -> torch.nn.Module:
    """Tiny random Swin in eval mode, with a random (not zero) relative position bias so it matters."""
    config = T.SwinConfig(**{**TINY_SWIN, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = CLASSES[name](config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_(std=1.0)
    return model


def _attention_tokens(model, pixels) -> list[int]:
    """Tokens per window each attention call runs on, in layer order."""
    seen: list[int] = []
    attentions = [m for m in model.modules() if isinstance(m, T.models.swin.modeling_swin.SwinAttention)]
    hooks = [a.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1])) for a in attentions]
    with torch.no_grad():
        model(pixels)
    for hook in hooks:
        hook.remove()
    return seen


def _stock_macs(config, grid: int, num_labels: int) -> int:
    """Closed-form MACs of the unpatched tiny Swin (square grid divisible by the window in every stage)."""
    total = grid * grid * config.embed_dim * config.num_channels * config.patch_size**2
    channels = config.embed_dim
    for stage, depth in enumerate(config.depths):
        tokens = grid * grid
        window = min(config.window_size, grid)
        per_window = window * window
        attention = (tokens // per_window) * (4 * per_window * channels**2 + 2 * per_window**2 * channels)
        mlp = 2 * tokens * channels * int(config.mlp_ratio * channels)
        total += depth * (attention + mlp)
        if stage < len(config.depths) - 1:
            total += (tokens // 4) * 4 * channels * 2 * channels
            grid, channels = grid // 2, channels * 2
    return total + channels * num_labels


@pytest.mark.compat
@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("overrides", [{}, {"image_size": 40, "patch_size": 4}], ids=["divisible", "padded"])
def test_r0_equals_unpatched(name, attn_implementation, overrides, pixels):
    model = make_swin(name, attn_implementation, **overrides)
    pixels = torch.nn.functional.interpolate(pixels, size=model.config.image_size)
    with torch.no_grad():
        reference = main_output(model(pixels))
        hf_tome.apply(model, r=0, extra={"swin_merge_mlp": True})
        patched = main_output(model(pixels))
    assert hf_tome.is_patched(model)
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings,expected", [
    ({"r": 3}, [13, 13, 13, 13]),
    ({"r": 100}, [8, 8, 8, 8]),  # clamped to half the window tokens
    ({"r": [1, 2, 3]}, [15, 14, 13, 16]),  # per layer, padded with 0
    ({"extra": {"swin_stage_r": [2, 6]}}, [14, 14, 10, 10]),
    ({"extra": {"swin_stage_r": [0, 5], "swin_merge_mlp": True}}, [16, 16, 11, 11]),
])
def test_attention_runs_on_merged_tokens_per_window(settings, expected, pixels):
    model = make_swin()
    hf_tome.apply(model, **settings)
    assert _attention_tokens(model, pixels) == expected
    report = hf_tome.compute_report(model)
    windows = [WINDOWS_PER_STAGE[0]] * 2 + [WINDOWS_PER_STAGE[1]] * 2
    assert report.tokens_in == [w * n for w, n in zip(windows, expected, strict=True)]


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("merge_mlp", [False, True])
def test_output_grid_shapes_unchanged(name, merge_mlp, pixels):
    model = make_swin(name)
    with torch.no_grad():
        reference = model(pixels, output_hidden_states=True)
        hf_tome.apply(model, r=5, extra={"swin_merge_mlp": merge_mlp})
        merged = model(pixels, output_hidden_states=True)
    assert main_output(merged).shape == main_output(reference).shape
    assert [h.shape for h in merged.hidden_states] == [h.shape for h in reference.hidden_states]
    assert [h.shape for h in merged.reshaped_hidden_states] == [h.shape for h in reference.reshaped_hidden_states]
    assert not torch.allclose(main_output(merged), main_output(reference))
    assert torch.isfinite(main_output(merged)).all()


@pytest.mark.compat
@pytest.mark.parametrize("merge_mlp", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"image_size": 40, "patch_size": 4}], ids=["divisible", "padded"])
def test_batch_invariance(merge_mlp, overrides, pixels):
    model = make_swin("swin", **overrides)
    pixels = torch.nn.functional.interpolate(pixels, size=model.config.image_size)
    hf_tome.apply(model, extra={"swin_stage_r": [6, 4], "swin_merge_mlp": merge_mlp})
    with torch.no_grad():
        batched = main_output(model(pixels))
        single = torch.cat([main_output(model(pixels[i : i + 1])) for i in range(len(pixels))])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


@pytest.mark.compat
def test_eager_equals_sdpa_with_merged_windows(pixels):
    outputs = []
    for implementation in ("sdpa", "eager"):
        model = make_swin(attn_implementation=implementation)
        hf_tome.apply(model, r=6, extra={"swin_merge_mlp": True})
        with torch.no_grad():
            outputs.append(model(pixels).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)


@pytest.mark.compat
def test_save_load_round_trip(pixels, tmp_path):
    model = make_swin()
    hf_tome.apply(model, prop_attn=False, extra={"swin_stage_r": [4, 2], "swin_merge_mlp": True})
    model.save_pretrained(tmp_path)
    reloaded = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.tome_config == hf_tome.ToMeConfig(prop_attn=False, extra={"swin_stage_r": [4, 2],
                                                                             "swin_merge_mlp": True})
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, model(pixels).logits, atol=1e-6, rtol=0)
    plain = T.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(plain) is T.SwinForImageClassification
    hf_tome.remove(model)
    assert type(model) is T.SwinForImageClassification and not hasattr(model.config, "tome")
    with torch.no_grad():
        torch.testing.assert_close(plain(pixels).logits, model(pixels).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(CLASSES))
def test_macs_drop_with_r_and_match_stock_formula_at_r0(name):
    model = make_swin(name)
    num_labels = 5 if name == "swin-cls" else 0
    stock = _stock_macs(model.config, 16, num_labels)
    assert hf_tome.compute_report(model).total_macs == stock
    hf_tome.apply(model, r=0)
    assert hf_tome.compute_report(model).total_macs == stock
    totals = []
    for r in (1, 3, 5, 8):
        hf_tome.apply(model, r=r)
        attention_only = hf_tome.compute_report(model).total_macs
        hf_tome.apply(model, r=r, extra={"swin_merge_mlp": True})
        with_mlp = hf_tome.compute_report(model).total_macs
        assert with_mlp < attention_only < stock
        totals.append(attention_only)
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    # A larger input follows the same formula (32 x 32 grid).
    hf_tome.apply(model, r=0)
    assert hf_tome.compute_report(model, (64, 64)).total_macs == _stock_macs(model.config, 32, num_labels)


def test_swin_tiny_macs_match_published_figure():
    config = T.SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          image_size=224, num_labels=1000)
    with torch.device("meta"):
        model = T.SwinForImageClassification(config)
    assert round(hf_tome.compute_report(model).gmacs, 1) == 4.5  # Swin-T: 4.5 GFLOPs (MACs) in the paper


@pytest.mark.parametrize("model_class", [T.SwinForMaskedImageModeling, T.SwinBackbone])
def test_unsupported_swin_variants_raise(model_class):
    model = model_class(T.SwinConfig(**TINY_SWIN))
    with pytest.raises(ValueError, match=rf"hf_tome does not support {model_class.__name__}: expected one of .*"
                                         r"SwinForImageClassification, SwinModel"):
        hf_tome.apply(model, r=2)


@pytest.mark.parametrize("settings,message", [
    ({"r": 2, "extra": {"swin_stage_r": [1, 1]}}, "expected r=0"),
    ({"extra": {"swin_stage_r": [1, 1, 1]}}, "expected a list of 2 ints"),
    ({"extra": {"swin_merge_mlp": 1}}, "expected True or False"),
    ({"extra": {"swin_window_r": 2}}, r"ToMeConfig.extra has unknown key\(s\) \['swin_window_r'\] for the swin "
                                      r"adapter: expected some of \['budget_full_gflops', 'budget_image_size', "
                                      r"'swin_bias', 'swin_merge_mlp', 'swin_stage_r'\]$"),
    ({"trace_source": True}, "expected trace_source=False"),
    ({"extra": {"swin_bias": "mean"}}, r"expected one of \('logsumexp', 'representative'\)"),
])
def test_invalid_settings_raise_before_patching(settings, message):
    model = make_swin()
    with pytest.raises(ValueError, match=message):
        hf_tome.apply(model, **settings)
    assert not hf_tome.is_patched(model)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_in_train_mode(checkpointing, pixels):
    model = make_swin()
    hf_tome.apply(model, r=5, extra={"swin_merge_mlp": True})
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    model(pixels, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    table = model.swin.encoder.layers[0].blocks[1].attention.relative_position_bias.relative_position_bias_table
    assert table.grad.abs().sum() > 0


@pytest.mark.parametrize("grid,padded", [(16, 16), (10, 12)])
def test_merges_never_cross_shift_regions_or_padding(grid, padded):
    layer = make_swin().swin.encoder.layers[0].blocks[1]  # a shifted layer
    labels = window_labels(layer, grid, grid, padded, padded, torch.device("cpu"))
    assert labels.shape == ((padded // 4) ** 2, WINDOW_TOKENS)
    assert bool((labels % 2 == 1).any()) == (padded > grid)  # odd labels mark padding
    labels = labels.repeat(3, 1)
    torch.manual_seed(2)
    matching = match_windows(torch.randn(labels.shape[0], WINDOW_TOKENS, 8), 8, labels)
    groups = matching.new_positions(WINDOW_TOKENS)
    same_group = groups[:, :, None] == groups[:, None, :]
    same_label = labels[:, :, None] == labels[:, None, :]
    assert (same_group <= same_label).all()
    assert same_group.sum() > labels.numel()  # something merged


def _reference_bias(matching, position_bias, shift_mask, prop_attn, rule):
    """Brute force over groups: logsumexp over key members of the mean over query members (or the bias between
    each group's representative, its odd member if any, plus log size), plus the mask at any member."""
    positions = matching.new_positions(position_bias.shape[-1])
    windows, merged = positions.shape[0], int(positions.max()) + 1
    out = torch.empty(windows, position_bias.shape[0], merged, merged)
    for w in range(windows):
        groups = [(positions[w] == g).nonzero()[:, 0] for g in range(merged)]
        reps = [int(g[g % 2 == 1][0]) if (g % 2 == 1).any() else int(g[0]) for g in groups]
        for i, rows in enumerate(groups):
            for j, cols in enumerate(groups):
                if rule == "representative":
                    value = position_bias[:, reps[i], reps[j]] + (math.log(len(cols)) if prop_attn else 0.0)
                else:
                    value = position_bias[:, rows][:, :, cols].mean(-2).logsumexp(-1)
                    value = value - (0.0 if prop_attn else math.log(len(cols)))
                out[w, :, i, j] = value + (shift_mask[w, rows[0], cols[0]] if shift_mask is not None else 0)
    return out


@pytest.mark.parametrize("rule", ["logsumexp", "representative"])
@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_merged_bias_matches_brute_force(rule, prop_attn, with_mask):
    torch.manual_seed(3)
    windows, tokens, heads, r = 5, 16, 2, 7
    matching = match_windows(torch.randn(windows, tokens, 8), r, None)
    positions = matching.new_positions(tokens)
    size = matching.merge(torch.ones(windows, tokens, 1))
    position_bias = torch.randn(heads, tokens, tokens) * 3
    shift_mask = None
    if with_mask:  # constant within groups, as the region constraint guarantees for Swin's real mask
        shift_mask = torch.randn(windows, tokens - r, tokens - r)
        shift_mask = shift_mask.gather(1, positions[..., None].expand(-1, -1, tokens - r))
        shift_mask = shift_mask.gather(2, positions[:, None, :].expand(-1, tokens, -1))
    got = merged_window_bias(positions, group_members(matching, tokens), position_bias, size, shift_mask, prop_attn,
                             rule)
    torch.testing.assert_close(got, _reference_bias(matching, position_bias, shift_mask, prop_attn, rule))
    # A constant bias reduces to ToMe's proportional attention: log(size) of each key.
    flat = merged_window_bias(positions, group_members(matching, tokens), torch.zeros(heads, tokens, tokens), size,
                              None, True, rule)
    torch.testing.assert_close(flat, size.log().view(windows, 1, 1, -1).expand_as(flat))


def test_bias_rules_differ_but_both_run(pixels):
    outputs = []
    for rule in ("logsumexp", "representative"):
        model = make_swin()
        hf_tome.apply(model, r=6, extra={"swin_bias": rule})
        with torch.no_grad():
            outputs.append(model(pixels).logits)
    assert not torch.allclose(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[1], atol=0.05, rtol=0)  # two readings of the same bias
