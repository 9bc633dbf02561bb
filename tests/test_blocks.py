"""DC-ViT's architecture: compressed blocks, MACs planning, rebuilding from the config, ToMe on top."""

from __future__ import annotations

import pytest
import torch
from conftest import main_output, make_model

import hf_tome
from hf_tome.dcvit import blocks
from hf_tome.dcvit.block_budget import block_costs, plan_blocks

BLOCK_FAMILIES = ["vit-cls", "deit-cls", "dinov2-cls", "dinov2-reg-cls", "vit", "dinov2"]


def _tokens(model) -> int:
    from hf_tome.integration.registry import find_adapter

    shape = find_adapter(model).encoder_shape(model, None)
    return shape.num_patches + shape.protected


@pytest.mark.parametrize("name", BLOCK_FAMILIES)
def test_compressed_blocks_change_macs_by_the_formula(name):
    model = make_model(name, num_hidden_layers=5)
    full = hf_tome.compute_report(model)
    costs = block_costs(model)
    tokens, width = _tokens(model), model.config.hidden_size
    assert costs.full_macs == full.total_macs
    assert costs.unit_macs == 2 * tokens * width
    assert costs.attention_macs == 4 * tokens * width**2 + 2 * tokens**2 * width
    layers = blocks.encoder_layers(model)
    blocks.compress_layer(layers[1], 10)
    blocks.compress_layer(layers[3], 0)
    blocks.record_compression(model, method="dc-vit")
    report = hf_tome.compute_report(model)
    units = costs.mlp_units
    assert report.layer_macs[1] == 10 * costs.unit_macs
    assert report.layer_macs[3] == 0
    assert report.total_macs == full.total_macs - 2 * costs.attention_macs - (2 * units - 10) * costs.unit_macs
    assert model.config.block_compression["mlp_kept"] == {"1": 10, "3": 0}


@pytest.mark.parametrize("name", ["vit-cls", "deit-cls", "dinov2-cls"])
@pytest.mark.parametrize("target", [0.9, 0.75, 0.62, 0.4])
def test_planned_macs_match_the_target_within_one_mlp_unit(name, target):
    model = make_model(name, num_hidden_layers=8)
    costs = block_costs(model)
    plan = plan_blocks(costs, target)
    chosen = [2, 5, 3, 6, 1, 4][: plan.num_blocks]
    layers = blocks.encoder_layers(model)
    for block, units in blocks.split_units(plan.kept_units, chosen).items():
        blocks.compress_layer(layers[block], units)
    blocks.record_compression(model)
    achieved = hf_tome.compute_report(model).total_macs
    assert abs(achieved - target * costs.full_macs) <= costs.unit_macs / 2 + 1
    assert achieved == plan.planned_macs
    widths = [blocks.mlp_width(layers[b]) for b in chosen]
    assert max(widths) - min(widths) <= 1  # one ratio for all compressed blocks


def test_target_in_gmacs_and_dense_targets():
    model = make_model("dinov2-cls", num_hidden_layers=8)
    costs = block_costs(model)
    plans = [plan_blocks(costs, fraction) for fraction in (0.80, 0.79, 0.78, 0.77)]
    assert len({p.planned_macs for p in plans}) == 4  # every target gets its own model, not a block step
    from hf_tome.dcvit.block_budget import target_to_macs

    assert target_to_macs(4.5, 6_000_000_000) == 4_500_000_000  # > 1: GMACs per image
    assert target_to_macs(0.75, 6_000_000_000) == 4_500_000_000  # <= 1: a fraction of the full model


def test_infeasible_targets_name_the_range():
    model = make_model("vit-cls", num_hidden_layers=6)
    costs = block_costs(model)
    with pytest.raises(ValueError, match=r"outside the range DC-ViT reaches: expected .*GMACs"):
        plan_blocks(costs, 0.99)
    with pytest.raises(ValueError, match=r"outside the range DC-ViT reaches"):
        plan_blocks(costs, 0.05)
    with pytest.raises(ValueError, match=r"MACs target -1 is invalid: expected a fraction"):
        plan_blocks(costs, -1)
    with pytest.raises(ValueError, match=r"method='prune' is invalid: expected 'dc-vit' or 'drop'"):
        plan_blocks(costs, 0.7, method="prune")
    drop = plan_blocks(costs, 0.7, method="drop")
    assert drop.kept_units == 0 and drop.num_blocks == round(0.3 * costs.full_macs / costs.block_macs)


@pytest.mark.compat
@pytest.mark.parametrize("name", BLOCK_FAMILIES)
def test_save_and_reload_rebuilds_the_compressed_blocks(name, pixels, tmp_path):
    model = make_model(name, num_hidden_layers=5)
    layers = blocks.encoder_layers(model)
    importance = torch.rand(blocks.mlp_width(layers[2]))
    blocks.compress_layer(layers[2], 7, importance)
    blocks.compress_layer(layers[3], 0)
    blocks.record_compression(model, method="dc-vit")
    expected = main_output(model(pixel_values=pixels))
    model.save_pretrained(tmp_path)
    auto = hf_tome.AutoModelForImageClassification if name.endswith("cls") else hf_tome.AutoModel
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert blocks.compression_of(reloaded) == {2: 7, 3: 0}
    torch.testing.assert_close(main_output(reloaded(pixel_values=pixels)), expected, rtol=0, atol=0)
    assert (tmp_path / "README.md").exists() is False  # plain save_pretrained of a stock model writes no card
    reloaded.save_pretrained(tmp_path / "again")  # the hf_tome-loaded model saves its card
    assert "block_compression" in (tmp_path / "again" / "config.json").read_text()
    assert "| 2 | removed | 7 |" in (tmp_path / "again" / "README.md").read_text()


def test_compressed_block_keeps_the_selected_units():
    model = make_model("vit-cls")
    layer = blocks.encoder_layers(model)[1]
    fc1 = layer.mlp.fc1.weight.detach().clone()
    importance = torch.zeros(fc1.shape[0])
    importance[[3, 40, 7]] = torch.tensor([1.0, 3.0, 2.0])
    blocks.compress_layer(layer, 3, importance)
    torch.testing.assert_close(layer.mlp.fc1.weight, fc1[[3, 7, 40]])
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x)[0] if isinstance(layer(x), tuple) else layer(x),
                               x + layer.mlp(layer.layernorm_after(x)))
    with pytest.raises(ValueError, match=r"kept_units=9 is invalid for a block with 3 MLP units: expected 0..3"):
        blocks.compress_layer(layer, 9)


def test_tome_runs_on_top_of_compressed_blocks(pixels, tmp_path):
    model = make_model("dinov2-cls", num_hidden_layers=5)
    layers = blocks.encoder_layers(model)
    blocks.compress_layer(layers[1], 20)
    blocks.compress_layer(layers[2], 20)
    blocks.record_compression(model, method="dc-vit")
    model.save_pretrained(tmp_path)
    merged = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path, tome_r=4).eval()
    report = hf_tome.compute_report(merged)
    # Blocks without attention have no keys to match on: the count carries through them.
    assert report.tokens_in == [65, 61, 61, 61, 57]
    assert merged(pixel_values=pixels).logits.shape == (4, 5)
    unmerged = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf_tome.remove(unmerged)(pixel_values=pixels).logits,
                               model(pixel_values=pixels).logits)


def test_unsupported_family_is_refused():
    from transformers import SwinConfig, SwinModel

    model = SwinModel(SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 1], image_size=32, patch_size=4,
                                 window_size=2))
    with pytest.raises(ValueError, match=r"block compression does not support SwinModel: expected a model of the "
                                         r"ViT, DeiT and Dinov2"):
        blocks.encoder_layers(model)
