"""Storing a Dinov2 position grid for the input size in use (the default model's 518 -> 224 px step), on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as T

import hf_tome
from hf_tome.evaluation.assets.default_model import resample_position_embeddings

TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=4,
                   image_size=40, num_labels=3)  # a 10x10 trained grid, like the real model's 37x37 one

CLASSIFIERS = {
    "dinov2": (T.Dinov2ForImageClassification, T.Dinov2Config, {}),
    "dinov2-reg": (T.Dinov2WithRegistersForImageClassification, T.Dinov2WithRegistersConfig,
                   {"num_register_tokens": 2}),
}


def _tiny(name: str) -> torch.nn.Module:
    model_class, config_class, extra = CLASSIFIERS[name]
    torch.manual_seed(0)
    return model_class(config_class(**TINY_DINOV2, **extra)).eval()


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
@pytest.mark.parametrize("size", [16, 24])
def test_resampled_model_matches_on_the_fly_interpolation(name: str, size: int) -> None:
    original = _tiny(name)
    before = original.base_model.embeddings.position_embeddings.detach().clone()
    resized = resample_position_embeddings(original, size)
    grid = size // 4
    assert resized.config.image_size == size and original.config.image_size == 40
    assert tuple(resized.base_model.embeddings.position_embeddings.shape) == (1, 1 + grid * grid, 32)
    assert torch.equal(original.base_model.embeddings.position_embeddings, before)  # the original is untouched
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = original(pixel_values=pixels, output_hidden_states=True)
        actual = resized(pixel_values=pixels, output_hidden_states=True)
    assert float((expected.logits - actual.logits).abs().max()) <= 1e-6
    assert float((expected.hidden_states[-1] - actual.hidden_states[-1]).abs().max()) <= 1e-6
    protected = 1 + getattr(resized.config, "num_register_tokens", 0)
    report = hf_tome.compute_report(resized)
    assert report.tokens_in[0] == grid * grid + protected
    assert report.total_macs == hf_tome.compute_report(original, (size, size)).total_macs


def test_resampled_model_reloads(tmp_path: Path) -> None:
    resized = resample_position_embeddings(_tiny("dinov2"), 16)
    resized.save_pretrained(tmp_path)
    reloaded = T.Dinov2ForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.image_size == 16
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, resized(pixel_values=pixels).logits)


def test_resample_rejects_a_size_that_is_not_a_patch_multiple() -> None:
    with pytest.raises(ValueError, match="multiple"):
        resample_position_embeddings(_tiny("dinov2"), 18)
