"""DC-ViT's least-squares init (``--init least-squares``): the refit of a compressed block's MLP output layer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from conftest import make_model
from test_compress import _options

from hf_tome.dcvit import blocks
from hf_tome.dcvit.compress import run_compress
from hf_tome.dcvit.mimic import feature_mse, output_tokens
from hf_tome.dcvit.refit import refit_block
from hf_tome.dcvit.stages import embed, run_blocks
from hf_tome.dcvit.trial import compress_block, compression_order


def _generated_teacher(name: str, block: int, units: int):
    """A student with ``block`` compressed to ``units`` units and a teacher that is the same model with only that
    block's ``fc2`` replaced by random weights: the exact answer of the refit is known (the teacher's ``fc2``)."""
    student = make_model(name)
    blocks.compress_layer(blocks.encoder_layers(student)[block], units)
    teacher = copy.deepcopy(student)
    fc2 = blocks.encoder_layers(teacher)[block].mlp.fc2
    torch.manual_seed(1)
    with torch.no_grad():
        fc2.weight.normal_(std=0.3)
        fc2.bias.normal_(std=0.3)
    return student, teacher


@pytest.mark.parametrize("name", ["dinov2-cls", "vit-cls", "dinov2-reg"])  # with and without a layer scale
def test_refit_recovers_the_output_layer_that_generated_the_targets(name):
    student, teacher = _generated_teacher(name, block=1, units=20)
    pixels = torch.randn(6, 3, 32, 32)
    result = refit_block(student, teacher, 1, pixels, ridge=1e-12)
    fitted = blocks.encoder_layers(student)[1].mlp.fc2
    expected = blocks.encoder_layers(teacher)[1].mlp.fc2
    torch.testing.assert_close(fitted.weight, expected.weight, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fitted.bias, expected.bias, atol=1e-3, rtol=1e-3)
    assert result.kept and result.mse_after < 1e-8 < result.mse_before
    assert result.tokens == 6 * (embed(student, pixels).shape[1])


def test_refit_matches_the_original_block_better_than_the_kept_units():
    original = make_model("dinov2-cls", num_hidden_layers=6)
    student = copy.deepcopy(original)
    pixels = torch.randn(8, 3, 32, 32)
    published_student = copy.deepcopy(original)
    published = compress_block(published_student, original, 2, 20, pixels, Accelerator(cpu=True))
    result = compress_block(student, original, 2, 20, pixels, Accelerator(cpu=True), init="least-squares")
    assert published is None
    assert result.mse_after < 0.5 * result.mse_before
    with torch.no_grad():  # the reported error is the block's, measured again here
        entering = run_blocks(student, embed(student, pixels), 0, 2)
        leaving = run_blocks(original, embed(original, pixels), 0, 3)
        error = (run_blocks(student, entering, 2, 3) - leaving).pow(2).mean().item()
    assert error == pytest.approx(result.mse_after, rel=1e-4)
    assert blocks.mlp_width(blocks.encoder_layers(student)[2]) == 20  # same shape: the MACs do not change
    teacher = output_tokens(original, pixels)
    assert feature_mse(student, pixels, teacher) < feature_mse(published_student, pixels, teacher)


def test_a_refit_that_would_raise_the_error_is_not_applied():
    student, teacher = _generated_teacher("dinov2-cls", block=1, units=20)
    weight = blocks.encoder_layers(student)[1].mlp.fc2.weight.detach().clone()
    result = refit_block(student, teacher, 1, torch.randn(4, 3, 32, 32), ridge=1e8)  # shrinks every weight to 0
    assert not result.kept and result.mse_after > result.mse_before
    torch.testing.assert_close(blocks.encoder_layers(student)[1].mlp.fc2.weight, weight)


def test_refit_and_init_refuse_what_they_cannot_do():
    model = make_model("dinov2-cls")
    with pytest.raises(ValueError, match=r"^block 1 is not a compressed block with MLP units: expected a block "
                       "whose attention was removed and that kept at least one MLP unit$"):
        refit_block(model, model, 1, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"^init='svd' is invalid: expected one of least-squares, published$"):
        compress_block(copy.deepcopy(model), model, 1, 10, torch.randn(2, 3, 32, 32), Accelerator(cpu=True),
                       init="svd")
    dropped = copy.deepcopy(model)  # a dropped block has nothing to refit: no error, no result
    assert compress_block(dropped, model, 1, 0, torch.randn(2, 3, 32, 32), Accelerator(cpu=True),
                          init="least-squares") is None


def test_compression_order_is_shallow_to_deep_only_with_the_least_squares_init():
    assert compression_order([6, 5, 3, 2], "least-squares") == [2, 3, 5, 6]
    assert compression_order([6, 5, 3, 2], "published") == [6, 5, 3, 2]


def test_compress_with_the_least_squares_init_records_every_refit(tiny_model_dir, image_folder, tmp_path):
    summary = run_compress(_options(tiny_model_dir, image_folder, tmp_path / "run", init="least-squares"))
    refit = summary["refit"]
    compressed = sorted(int(block) for block in summary["block_compression"]["mlp_kept"])
    assert sorted(int(block) for block in refit) == compressed
    assert all(entry["mse_after"] < entry["mse_before"] for entry in refit.values())
    assert summary["block_compression"]["init"] == "least-squares"
    progress = json.loads((tmp_path / "run" / "state" / "progress.json").read_text())
    assert progress["refit"] == refit
    assert progress["done"] == compressed  # shallow to deep
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "MLP output layer was refit by least squares to the original block's output" in card


def test_finetuning_with_no_iterations_changes_nothing_and_caches_nothing(monkeypatch):
    from hf_tome.dcvit import mimic

    student, teacher = _generated_teacher("dinov2-cls", block=1, units=20)
    before = {name: value.clone() for name, value in student.state_dict().items()}
    monkeypatch.setattr(mimic, "cache_prefix", lambda *args, **kwargs: pytest.fail("cached a prefix for 0 steps"))
    pixels = torch.randn(4, 3, 32, 32)
    losses = mimic.finetune_mimic(student, pixels, mimic.output_tokens(teacher, pixels), [1],
                                  Accelerator(cpu=True), iterations=0)
    assert losses == [] and not student.training
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, before[name])
