"""Token sizes stay exact in every model dtype: float32 sizes and log-size bias, hidden states in the model dtype.

bfloat16 holds integers exactly only up to 256 (float16 up to 2048), so sizes kept in the model dtype round once
one token holds more originals than that. Each model here is tiny (hidden size 16) but has the token count of a
real checkpoint, and enough merging layers that the last few tokens hold hundreds of originals each.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import hf_tome
import hf_tome.adapters.swin as swin_adapter
from hf_tome.core.ops import bipartite_soft_matching, merge_weighted, prune_and_merge, soft_prune_merge, unmerge
from hf_tome.core.plan import SoftKept
from hf_tome.core.reduce import proportional_attention_mask, reduce_layer_tokens, weighted_token_mean

HALF = [torch.bfloat16, torch.float16]
SMALL = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=9)


def _half(model: torch.nn.Module, dtype: torch.dtype, **settings) -> torch.nn.Module:
    """``model`` patched with ``settings``, cast to ``dtype``, in eval mode."""
    return hf_tome.apply(model, **settings).to(dtype).eval()


def _run(model: torch.nn.Module, base: torch.nn.Module, *args, **kwargs) -> tuple:
    """``model(*args, **kwargs)`` once, with the output of its submodule ``base`` (the one carrying the sizes)."""
    seen = []
    hook = base.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            output = model(*args, **kwargs)
    finally:
        hook.remove()
    return output, seen[0]


def _check_sizes(sizes: torch.Tensor, positions: torch.Tensor | None, expected_total: int) -> None:
    """float32, summing exactly to ``expected_total`` per sample, one token above 256, and (for ToMe merging) every
    size equal to the number of original positions its token holds."""
    assert sizes.dtype == torch.float32
    assert sizes.sum(dim=1).flatten().tolist() == [float(expected_total)] * sizes.shape[0]
    assert float(sizes.amax()) > 256
    if positions is not None:
        held = torch.zeros(sizes.shape[:2]).scatter_add_(1, positions, torch.ones(positions.shape))
        assert torch.equal(held, sizes[..., 0])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("model_class,config_class", [(T.ViTModel, T.ViTConfig),
                                                      (T.Dinov2ForImageClassification, T.Dinov2Config)])
def test_vit_style_1025_tokens(model_class, config_class, dtype):
    # 128 px / patch 4 -> 32 x 32 = 1024 patches + class token; 9 halvings leave 3 tokens.
    config = config_class(**SMALL, image_size=128, patch_size=4, num_labels=3)
    torch.manual_seed(0)
    model = _half(model_class(config), dtype, r=1000, trace_source=True)
    torch.manual_seed(1)
    final, out = _run(model, model.base_model, torch.randn(2, 3, 128, 128, dtype=dtype))
    assert out.last_hidden_state.shape[1] == 3 and out.last_hidden_state.dtype == dtype
    _check_sizes(out.token_sizes, out.token_positions, 1025)
    assert out.token_source.dtype == torch.float32
    assert torch.equal(out.token_source.sum(-1, keepdim=True), out.token_sizes)
    spread = unmerge(out.last_hidden_state, out.token_positions)
    assert spread.shape == (2, 1025, 16) and spread.dtype == dtype
    if hasattr(final, "logits"):  # Dinov2's head averages the patch tokens weighted by their float32 sizes
        assert final.logits.dtype == dtype and torch.isfinite(final.logits).all()


@pytest.mark.parametrize("dtype", HALF)
def test_whisper_encoder_1500_frames_and_cross_attention(dtype):
    config = T.WhisperConfig(vocab_size=50, num_mel_bins=8, d_model=16, encoder_layers=9, decoder_layers=1,
                             encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                             decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=8, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                             suppress_tokens=None)
    torch.manual_seed(0)
    model = _half(T.WhisperModel(config), dtype, r=1000)
    torch.manual_seed(1)
    out, encoded = _run(model, model.encoder, torch.randn(2, 8, 3000, dtype=dtype),
                        decoder_input_ids=torch.tensor([[1, 5, 7], [1, 9, 3]]))
    assert encoded.last_hidden_state.shape[1] == 3 and encoded.last_hidden_state.dtype == dtype
    _check_sizes(encoded.token_sizes, encoded.token_positions, 1500)
    # The decoder cross-attends with log(size) of the float32 sizes, cast to its own dtype.
    assert out.encoder_token_sizes.dtype == torch.float32
    assert torch.equal(out.encoder_token_sizes, encoded.token_sizes)
    assert out.last_hidden_state.dtype == dtype and torch.isfinite(out.last_hidden_state).all()


@pytest.mark.parametrize("dtype", HALF)
def test_videomae_1568_tubelets_and_weighted_mean_pooling(dtype):
    # 16 frames of 56 px, tubelets 2 x 4 x 4 -> 8 * 14 * 14 = 1568 tubelets, none protected (mean pooling).
    config = T.VideoMAEConfig(**SMALL, num_frames=16, image_size=56, patch_size=4, tubelet_size=2, num_labels=3)
    torch.manual_seed(0)
    model = _half(T.VideoMAEForVideoClassification(config), dtype, r=1000)
    torch.manual_seed(1)
    final, out = _run(model, model.videomae, torch.randn(2, 16, 3, 56, 56, dtype=dtype))
    assert out.last_hidden_state.shape[1] == 4 and out.last_hidden_state.dtype == dtype
    _check_sizes(out.token_sizes, out.token_positions, 1568)
    assert final.logits.dtype == dtype and torch.isfinite(final.logits).all()


@pytest.mark.parametrize("dtype", HALF)
def test_vivit_3137_tokens(dtype):
    # 32 frames of 56 px, tubelets 2 x 4 x 4 -> 16 * 14 * 14 = 3136 tubelets + class token.
    config = T.VivitConfig(**SMALL, num_frames=32, image_size=56, tubelet_size=[2, 4, 4])
    torch.manual_seed(0)
    model = _half(T.VivitModel(config), dtype, r=2000)
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(torch.randn(1, 32, 3, 56, 56, dtype=dtype))
    assert out.last_hidden_state.shape[1] == 8 and out.last_hidden_state.dtype == dtype
    _check_sizes(out.token_sizes, out.token_positions, 3137)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("merge_mlp", [False, True])
def test_swin_window_of_1024_tokens(dtype, merge_mlp, monkeypatch):
    # 64 px / patch 2 -> one 32 x 32 window (no shift). Uniform images make every token alike, so all 512
    # merged A tokens land on one B token: a group of 513 (stored as 512 in bfloat16).
    config = T.SwinConfig(image_size=64, patch_size=2, embed_dim=8, depths=[1], num_heads=[2], window_size=32,
                          mlp_ratio=2.0)
    sizes = []

    def spy(positions, members, position_bias, size, *args, **kwargs):
        sizes.append(size)
        return merged_window_bias(positions, members, position_bias, size, *args, **kwargs)

    merged_window_bias = swin_adapter.merged_window_bias
    monkeypatch.setattr(swin_adapter, "merged_window_bias", spy)
    torch.manual_seed(0)
    model = _half(T.SwinModel(config), dtype, extra={"swin_stage_r": [512], "swin_merge_mlp": merge_mlp})
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 1, 1).expand(-1, -1, 64, 64).to(dtype))
    assert out.last_hidden_state.dtype == dtype and out.last_hidden_state.shape == (2, 1024, 8)
    (size,) = sizes
    assert size.shape == (2, 512, 1)
    _check_sizes(size, None, 1024)
    assert float(size.amax()) == 513


@pytest.mark.parametrize("dtype,merge_match,prune_kept,merge_kept", [
    # Block 1 prunes 1025 -> 1000 and merges the rest into 2 tokens (+ class); later blocks keep them.
    *[(dtype, "class_attention", [1025, 1000, 3, 3], [1025, 3, 3, 3]) for dtype in HALF],
    # Bipartite merging halves the survivors at most, once per block: 1000 -> 501 -> ... -> 3.
    (torch.bfloat16, "bipartite", [1025, 1000, 501, 251, 126, 64, 33, 17, 9, 5],
     [1025, 501, 251, 126, 64, 33, 17, 9, 5, 3]),
])
def test_prune_merge_sizes_add_up_to_the_survivors(dtype, merge_match, prune_kept, merge_kept):
    config = T.ViTConfig(**{**SMALL, "num_hidden_layers": len(prune_kept)}, image_size=128, patch_size=4)
    torch.manual_seed(0)
    model = _half(T.ViTModel(config), dtype, prune_kept=prune_kept, merge_kept=merge_kept, merge_match=merge_match,
                  trace_source=True)
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 128, dtype=dtype))
    assert out.last_hidden_state.shape[1] == 3 and out.last_hidden_state.dtype == dtype
    # Pruned tokens are dropped: the sizes add up to the 1000 survivors of block 1's pruning.
    _check_sizes(out.token_sizes, None, 1000)
    assert torch.equal(out.token_source.sum(-1, keepdim=True), out.token_sizes)
    assert unmerge(out.last_hidden_state, out.token_positions).shape == (2, 1025, 16)


@pytest.mark.parametrize("dtype", HALF)
def test_soft_prune_merge_keeps_float32_mass(dtype):
    torch.manual_seed(3)
    batch, tokens, protected, kept = 2, 600, 1, 3
    x, metric, scores = torch.randn(batch, tokens, 8, dtype=dtype), torch.randn(batch, tokens, 4), torch.rand(batch,
                                                                                                             tokens)
    ranks = torch.arange(tokens)
    keep, prune = (ranks < kept).float(), torch.ones(tokens)
    # Through the layer reducer, which starts the sizes itself (float32 ones).
    hidden, size, _, _ = reduce_layer_tokens(x, metric, scores, None, None, None, 0, SoftKept(keep, prune, kept),
                                             protected)
    assert hidden.dtype == dtype and hidden.shape == x.shape
    present = size[..., 0] > 0.5
    assert present.sum(1).tolist() == [kept] * batch
    _check_sizes(size[present].reshape(batch, kept, 1), None, tokens)
    # The hard step it relaxes, merged in float32 from the same inputs.
    step = prune_and_merge(scores, metric, tokens, kept, protected)
    ones = torch.ones(batch, tokens, 1)
    hard = (step.merge(x.float() * ones) / step.merge(ones)).to(dtype)
    torch.testing.assert_close(hidden[present].reshape(batch, kept, 8), hard)
    soft, mass = soft_prune_merge(x, torch.ones(batch, tokens, 1, dtype=dtype), scores, metric, keep, prune, kept,
                                  protected)
    assert soft.dtype == dtype and mass.dtype == torch.float32


def test_log_size_bias_is_float32_until_handed_to_attention():
    size = torch.tensor([[[1.0], [257.0], [1023.0]]])
    for dtype in [torch.float32, *HALF]:
        bias = proportional_attention_mask(None, size, True, dtype)
        assert bias.dtype == dtype and bias.shape == (1, 1, 1, 3)
        assert torch.equal(bias, size.log().to(dtype)[:, None, None, :, 0])
    # Sizes handed over in another dtype still get their log in float32.
    assert torch.equal(proportional_attention_mask(None, size.to(torch.float16), True, torch.bfloat16),
                       size.log().to(torch.bfloat16)[:, None, None, :, 0])


def test_float32_merging_is_the_plain_formula_bit_for_bit():
    torch.manual_seed(4)
    x, size = torch.randn(3, 33, 8), torch.randint(1, 9, (3, 33, 1)).float()
    matching = bipartite_soft_matching(torch.randn(3, 33, 5), 12, protected=1)
    merged, merged_size = merge_weighted(matching, x, size)
    assert torch.equal(merged, matching.merge(x * size) / matching.merge(size))
    assert torch.equal(merged_size, matching.merge(size))
    assert torch.equal(weighted_token_mean(x, size), (x * size).sum(dim=1) / size.sum(dim=1))


@pytest.mark.parametrize("dtype", HALF)
def test_weighted_mean_and_merge_of_half_tokens_count_in_float32(dtype):
    tokens = torch.ones(1, 2, 4, dtype=dtype)
    tokens[:, 1] = 2.0
    size = torch.tensor([[[1.0], [2048.0 + 1]]])  # neither 2049 nor 1 + 2049 exists in bfloat16 or float16
    mean = weighted_token_mean(tokens, size)
    assert mean.dtype == dtype
    assert torch.equal(mean, torch.full((1, 4), (1 + 2 * 2049) / 2050).to(dtype))
    matching = bipartite_soft_matching(torch.ones(1, 2, 3), 1, protected=0)
    merged, merged_size = merge_weighted(matching, tokens, size)
    assert merged.dtype == dtype and merged_size.dtype == torch.float32
    assert merged_size.flatten().tolist() == [2050.0]


def _tiny_whisper(attn_implementation: str) -> torch.nn.Module:
    config = T.WhisperConfig(vocab_size=50, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=1,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_source_positions=32, max_target_positions=8, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                             suppress_tokens=None)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return T.WhisperModel(config)


@pytest.mark.parametrize("dtype", HALF)
def test_eager_equals_sdpa_in_half_precision(dtype):
    # The bias reaches both kernels in the query's dtype: a float32 mask would promote eager's logits to float32
    # (ViT), or make Whisper's eager attention multiply float32 weights with half values and fail.
    outputs = {}
    for attn_implementation in ["eager", "sdpa"]:
        config = T.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=4)
        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        vit = _half(T.ViTModel(config), dtype, r=6)
        whisper = _half(_tiny_whisper(attn_implementation), dtype, r=6)
        torch.manual_seed(1)
        pixels, features = torch.randn(4, 3, 32, 32, dtype=dtype), torch.randn(4, 8, 64, dtype=dtype)
        with torch.no_grad():
            outputs[attn_implementation] = (vit(pixels), whisper(features, decoder_input_ids=torch.ones(4, 3).long()))
    (vit_eager, whisper_eager), (vit_sdpa, whisper_sdpa) = outputs["eager"], outputs["sdpa"]
    assert torch.equal(vit_eager.token_sizes, vit_sdpa.token_sizes)
    assert torch.equal(whisper_eager.encoder_token_sizes, whisper_sdpa.encoder_token_sizes)
    for eager, sdpa in [(vit_eager.last_hidden_state, vit_sdpa.last_hidden_state),
                        (whisper_eager.encoder_last_hidden_state, whisper_sdpa.encoder_last_hidden_state),
                        (whisper_eager.last_hidden_state, whisper_sdpa.last_hidden_state)]:
        assert eager.dtype == sdpa.dtype == dtype
        torch.testing.assert_close(eager.float(), sdpa.float(), atol=0.05, rtol=0.02)
