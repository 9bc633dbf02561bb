"""MACs accounting against the published figures and against the counts a forward actually sees."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import hf_tome
from hf_tome.integration.flops import block_macs


def _meta_vit(**config) -> torch.nn.Module:
    with torch.device("meta"):  # real architecture, no memory or init cost
        return T.ViTForImageClassification(T.ViTConfig(num_labels=1000, **config))


def test_deit_small_and_base_unmerged():
    small = hf_tome.compute_report(_meta_vit(hidden_size=384, num_attention_heads=6, intermediate_size=1536))
    base = hf_tome.compute_report(_meta_vit())
    assert round(small.gmacs, 3) == 4.599
    assert round(base.gmacs, 3) == 17.564
    assert small.tokens_in == [197] * 12


def test_block_formula():
    assert block_macs(384, 1536, 197, 197) == 4 * 197 * 384**2 + 2 * 197**2 * 384 + 8 * 197 * 384**2
    assert block_macs(384, 1536, 197, 181) == 4 * 197 * 384**2 + 2 * 197**2 * 384 + 8 * 181 * 384**2


@pytest.mark.parametrize("r,expected_ratio", [(16, 2.0), ((16, -1.0), 3.0)])
def test_vit_base_reduction_ratios(r, expected_ratio):
    model = _meta_vit()
    full = hf_tome.compute_report(model).total_macs
    hf_tome.apply(model, hf_tome.ToMeConfig(r=r))  # (16, -1.0): ToMe's (r, inflect) notation
    report = hf_tome.compute_report(model)
    assert report.tokens_in[:3] == ([197, 181, 165] if expected_ratio == 2.0 else [197, 165, 136])
    assert round(full / report.total_macs, 1) == expected_ratio


def test_report_per_image_size_for_dinov2():
    with torch.device("meta"):
        model = T.Dinov2Model(T.Dinov2Config(image_size=518, patch_size=14))
    assert hf_tome.compute_report(model, image_size=(224, 224)).tokens_in[0] == 257
    assert hf_tome.compute_report(model).tokens_in[0] == 37 * 37 + 1
