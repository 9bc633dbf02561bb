"""Token merging on the audio (AST) and video (VideoMAE, ViViT) model classes, on tiny random configs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import main_output
from torch.utils.flop_counter import FlopCounterMode

import hf_tome
from hf_tome.core.ops import bipartite_soft_matching, merge_weighted, unmerge
from hf_tome.core.schedule import merge_schedule, tokens_per_layer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
LAYERS = 4
BASE = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, num_labels=5)
# Spectrogram of 32 frames x 16 mel bins, 4x4 patches with frequency stride 3 (overlapping) and time stride 4:
# (16 - 4) // 3 + 1 = 5 by (32 - 4) // 4 + 1 = 8 -> 40 patches.
AST = dict(max_length=32, num_mel_bins=16, patch_size=4, frequency_stride=3, time_stride=4)
# 6 frames of 12 x 12 px, tubelets of 2 frames x 4 x 4 px -> 3 * 3 * 3 = 27 tubelets (odd on purpose).
VIDEOMAE = dict(num_frames=6, image_size=12, patch_size=4, tubelet_size=2)
# 4 frames of 16 x 16 px, tubelets 2 x 4 x 4 -> 2 * 4 * 4 = 32 tubelets.
VIVIT = dict(num_frames=4, image_size=16, tubelet_size=[2, 4, 4])

# name -> (model class, config class, extra config, patches, protected tokens, input shape of one sample)
MODELS = {
    "ast": (T.ASTModel, T.ASTConfig, AST, 40, 2, (32, 16)),
    "ast-cls": (T.ASTForAudioClassification, T.ASTConfig, AST, 40, 2, (32, 16)),
    "videomae": (T.VideoMAEModel, T.VideoMAEConfig, VIDEOMAE, 27, 0, (6, 3, 12, 12)),
    "videomae-cls": (T.VideoMAEForVideoClassification, T.VideoMAEConfig, VIDEOMAE, 27, 0, (6, 3, 12, 12)),
    # Without mean pooling the head reads token 0, a tubelet, which is protected: 26 other tubelets + 1.
    "videomae-cls-token0": (T.VideoMAEForVideoClassification, T.VideoMAEConfig,
                            {**VIDEOMAE, "use_mean_pooling": False}, 26, 1, (6, 3, 12, 12)),
    "vivit": (T.VivitModel, T.VivitConfig, VIVIT, 32, 1, (4, 3, 16, 16)),
    "vivit-cls": (T.VivitForVideoClassification, T.VivitConfig, VIVIT, 32, 1, (4, 3, 16, 16)),
}
ALL = list(MODELS)
CLASSIFIERS = {"ast-cls": hf_tome.AutoModelForAudioClassification,
               "videomae-cls": hf_tome.AutoModelForVideoClassification,
               "videomae-cls-token0": hf_tome.AutoModelForVideoClassification,
               "vivit-cls": hf_tome.AutoModelForVideoClassification}


def make(name: str, attn_implementation: str = "sdpa", **overrides) -> torch.nn.Module:
    """A tiny random model of ``name`` in eval mode (deterministic weights)."""
    model_class, config_class, extra, *_ = MODELS[name]
    config = config_class(**{**BASE, **extra, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = model_class(config).eval()
    # Stock init leaves class/distillation tokens and learned position embeddings at zero; random values make
    # the protected tokens distinguishable from the patches, so a test would notice if they moved.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(("cls_token", "distillation_token", "position_embeddings")):
                param.normal_(0, 0.5)
    return model


def inputs(name: str, batch: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, *MODELS[name][5])


def expected_tokens(name: str, r: int, inflect: float = 0.0) -> list[int]:
    _, _, _, patches, protected, _ = MODELS[name]
    return tokens_per_layer(patches + protected, merge_schedule(r, LAYERS, inflect), protected)


def base_output(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> hf_tome.TokenMergeOutput:
    with torch.no_grad():
        return model.base_model(x, **kwargs)


@pytest.mark.compat
@pytest.mark.parametrize("name", ALL)
def test_r0_equals_unpatched(name):
    model, x = make(name), inputs(name)
    with torch.no_grad():
        reference = main_output(model(x))
        hf_tome.apply(model, r=0)
        patched = main_output(model(x))
    assert hf_tome.is_patched(model)
    assert type(model).__name__ == "ToMe" + MODELS[name][0].__name__
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("r,inflect", [(5, 0.0), (4, -1.0), (100, 0.0)])
def test_token_counts_follow_schedule_and_clamp(name, r, inflect):
    model, x = make(name), inputs(name)
    _, _, _, patches, protected, _ = MODELS[name]
    hf_tome.apply(model, r=r, inflect=inflect)
    expected = expected_tokens(name, r, inflect)
    out = base_output(model, x, output_hidden_states=True)
    # hidden_states: the embedding output, then every layer's output.
    assert [h.shape[1] for h in out.hidden_states] == expected
    assert out.last_hidden_state.shape[1] == expected[-1]
    report = hf_tome.compute_report(model)
    assert report.tokens_in == expected[:LAYERS]
    assert report.tokens_out == expected[1:]
    # Sizes count original tokens: every one is held by exactly one output token.
    assert torch.equal(out.token_sizes.sum(dim=(1, 2)), torch.full((4,), float(patches + protected)))
    assert torch.equal(out.token_sizes[:, :protected], torch.ones(4, protected, 1))
    if r == 100:  # clamped to half of the unprotected tokens in every layer
        unprotected = [patches]
        for _ in range(LAYERS):
            unprotected.append(unprotected[-1] - unprotected[-1] // 2)
        assert expected == [n + protected for n in unprotected]


def test_expected_counts_are_the_numbers_we_think():
    assert expected_tokens("ast", 5) == [42, 37, 32, 27, 22]
    assert expected_tokens("videomae", 100) == [27, 14, 7, 4, 2]
    assert expected_tokens("vivit", 4, -1.0) == [33, 25, 20, 18, 18]  # schedule 8, 5, 2, 0
    assert expected_tokens("videomae", 6) == [27, 21, 15, 9, 5]  # the last step is clamped to 9 // 2


@pytest.mark.parametrize("name", ["ast", "videomae", "vivit"])
def test_protected_tokens_stay_in_place_and_sources_add_up(name):
    model, x = make(name), inputs(name)
    _, _, _, patches, protected, _ = MODELS[name]
    hf_tome.apply(model, r=6, trace_source=True)
    out = base_output(model, x)
    total = patches + protected
    source = out.token_source
    assert source.shape == (4, expected_tokens(name, 6)[-1], total)
    assert torch.equal(source[:, :protected, :protected], torch.eye(protected).expand(4, -1, -1))
    assert source[:, :protected, protected:].sum() == 0
    assert torch.equal(source.sum(1), torch.ones(4, total))
    assert torch.equal(source.sum(-1, keepdim=True), out.token_sizes)
    assert torch.equal(source.argmax(1), out.token_positions)


@pytest.mark.compat
@pytest.mark.parametrize("name", ALL)
def test_batch_invariance(name):
    model, x = make(name), inputs(name)
    hf_tome.apply(model, r=5)
    with torch.no_grad():
        batched = main_output(model(x))
        single = torch.cat([main_output(model(x[i : i + 1])) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


@pytest.mark.compat
@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_save_load_round_trip(name, tmp_path):
    model, x = make(name), inputs(name)
    hf_tome.apply(model, r=3, inflect=-0.5, prop_attn=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tome"]["r"] == 3 and saved["tome"]["inflect"] == -0.5 and saved["tome"]["prop_attn"] is False
    assert saved["architectures"] == [MODELS[name][0].__name__]
    reloaded = CLASSIFIERS[name].from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.tome_config == hf_tome.ToMeConfig(r=3, inflect=-0.5, prop_attn=False)
    assert hf_tome.compute_report(reloaded).tokens_in == hf_tome.compute_report(model).tokens_in
    assert hf_tome.compute_report(reloaded).tokens_in[1] < hf_tome.compute_report(reloaded).tokens_in[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)
    # Plain transformers loads the same weights unmerged.
    plain = getattr(T, CLASSIFIERS[name].__name__).from_pretrained(tmp_path).eval()
    assert type(plain) is MODELS[name][0]
    hf_tome.remove(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, atol=1e-6, rtol=0)


@pytest.mark.compat
@pytest.mark.parametrize("name", ALL)
def test_eager_equals_sdpa_with_proportional_attention(name):
    sdpa, eager, x = make(name, "sdpa"), make(name, "eager"), inputs(name)
    for model in (sdpa, eager):
        hf_tome.apply(model, r=5, prop_attn=True)
    with torch.no_grad():
        torch.testing.assert_close(main_output(sdpa(x)), main_output(eager(x)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ast-cls", "videomae-cls", "vivit-cls"])
def test_proportional_attention_changes_outputs(name):
    with_prop, without, x = make(name), make(name), inputs(name)
    hf_tome.apply(with_prop, r=5, prop_attn=True)
    hf_tome.apply(without, r=5, prop_attn=False)
    with torch.no_grad():
        assert (with_prop(x).logits - without(x).logits).abs().max() > 1e-4


def test_videomae_mean_pooling_is_size_weighted():
    model, x = make("videomae-cls"), inputs("videomae-cls")
    hf_tome.apply(model, r=6)
    with torch.no_grad():
        logits = model(x).logits
        out = model.videomae(x)
        # Spreading merged tokens back over the original tubelets and taking a plain mean is the weighted mean.
        full_grid = unmerge(out.last_hidden_state, out.token_positions)
        assert full_grid.shape[1] == 27 and out.last_hidden_state.shape[1] == 5
        expected = model.classifier(model.fc_norm(full_grid.mean(1)))
        unweighted = model.classifier(model.fc_norm(out.last_hidden_state.mean(1)))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert (logits - unweighted).abs().max() > 1e-4


def test_videomae_without_mean_pooling_keeps_token_zero():
    model, x = make("videomae-cls-token0"), inputs("videomae-cls-token0")
    hf_tome.apply(model, r=6, trace_source=True)
    out = base_output(model, x)
    assert torch.equal(out.token_source[:, 0], torch.eye(27)[0].expand(4, -1))


@pytest.mark.parametrize("num_tokens", [9, 10])
def test_matching_with_no_protected_tokens(num_tokens):
    torch.manual_seed(num_tokens)
    x = torch.randn(3, num_tokens, 6)
    # Token 0 and token 1 are identical and everything else is far from them: with nothing protected, the single
    # best pair is (0, 1), so token 0 is merged away (it would be kept with protected=1).
    x[:, 1] = x[:, 0]
    x[:, 2:] -= 10 * x[:, :1]
    matching = bipartite_soft_matching(x, 1, protected=0)
    assert torch.equal(matching.merged_a[:, 0, 0], torch.zeros(3, dtype=torch.long))
    assert torch.equal(matching.destination_b[:, 0, 0], torch.zeros(3, dtype=torch.long))
    # Up to half of all tokens can go in one step; sizes and positions stay consistent.
    r = num_tokens // 2
    matching = bipartite_soft_matching(x, r, protected=0)
    merged, size = merge_weighted(matching, x, torch.ones(3, num_tokens, 1))
    assert merged.shape == (3, num_tokens - r, 6)
    assert torch.equal(size.sum(1), torch.full((3, 1), float(num_tokens)))
    positions = matching.new_positions(num_tokens)
    counts = torch.zeros(3, num_tokens - r).scatter_add_(1, positions, torch.ones(3, num_tokens))
    assert torch.equal(counts[..., None], size)
    with pytest.raises(ValueError, match="r=.* is out of range"):
        bipartite_soft_matching(x, r + 1, protected=0)


@pytest.mark.parametrize("name", ["ast-cls", "videomae-cls", "vivit-cls"])
@pytest.mark.parametrize("r", [0, 5])
def test_report_macs_match_counted_flops(name, r):
    """The report's MACs equal what torch counts in a forward, less the (uncounted) matching similarities."""
    batch = 2
    model, x = make(name, "eager"), inputs(name, batch)
    hf_tome.apply(model, r=r)
    report = hf_tome.compute_report(model)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    # Set A (even positions) @ set B (odd positions)^T on the head-averaged keys, in every merging layer.
    matching = sum((n + 1) // 2 * (n // 2) * head_dim for n, out in zip(report.tokens_in, report.tokens_out,
                                                                         strict=True) if out < n)
    assert counter.get_total_flops() == 2 * batch * (report.total_macs + matching)
    assert (matching > 0) == (r > 0)


def test_report_parts():
    ast_report = hf_tome.compute_report(make("ast-cls"))
    assert ast_report.embedding_macs == 40 * 4 * 4 * 32 and ast_report.head_macs == 32 * 5
    video_report = hf_tome.compute_report(make("videomae-cls"))
    assert video_report.embedding_macs == 27 * 3 * 2 * 4 * 4 * 32 and video_report.tokens_in[0] == 27
    vivit = make("vivit")
    vivit_report = hf_tome.compute_report(vivit)
    assert vivit_report.head_macs == 0 and vivit_report.tokens_in == [33] * LAYERS
    # Video reports take the frame size (what throughput.py passes: the inputs' last two dims) ...
    assert hf_tome.compute_report(vivit, (8, 8)).tokens_in[0] == 2 * 2 * 2 + 1
    assert hf_tome.compute_report(vivit, (16, 16)) == vivit_report
    # ... an AST report ignores it: the position embeddings fix the spectrogram size.
    assert hf_tome.compute_report(make("ast-cls"), (32, 16)) == ast_report


@pytest.mark.compat
@pytest.mark.parametrize("name", ["ast", "videomae-cls", "vivit-cls"])
def test_attentions_are_recorded_at_every_merged_size(name):
    model, x = make(name, "eager"), inputs(name, batch=2)
    hf_tome.apply(model, r=5)
    with torch.no_grad():
        out = model(x, output_attentions=True)
    counts = expected_tokens(name, 5)[:LAYERS]
    assert [tuple(a.shape) for a in out.attentions] == [(2, 4, n, n) for n in counts]
    assert torch.allclose(out.attentions[-1].sum(-1), torch.ones(2, 4, counts[-1]))


def test_benchmark_rows_reach_about_half_the_macs():
    spec = importlib.util.spec_from_file_location("families_av", BENCHMARKS / "families_av.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert list(module.families()) == ["AST", "VideoMAE-B", "ViViT-B"]
    table = module.macs_table()  # real architectures on the meta device: no forward pass
    assert {family: rows["unpatched"]["tokens_in"] for family, rows in table.items()} == {
        "AST": 1214, "VideoMAE-B": 1568, "ViViT-B": 3137}
    half = {"AST": "r=94", "VideoMAE-B": "r=121", "ViViT-B": "r=231"}
    for family, setting in half.items():
        assert 2.0 <= table[family][setting]["macs_reduction"] < 2.02


@pytest.mark.parametrize("name", ["ast-cls", "videomae-cls", "vivit-cls"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_in_train_mode(name, checkpointing):
    model, x = make(name), inputs(name)
    hf_tome.apply(model, r=5)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    model(x, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.compat
@pytest.mark.parametrize("name", ["videomae", "vivit-cls"])
def test_remove_restores_original_forward(name):
    model, x = make(name), inputs(name)
    stock = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        reference = main_output(model(x))
        hf_tome.apply(model, r=5)
        merged = main_output(model(x))
        hf_tome.remove(model)
        restored = main_output(model(x))
    assert merged.shape != reference.shape or not torch.equal(merged, reference)
    assert {n: type(m) for n, m in model.named_modules()} == stock
    assert torch.equal(restored, reference)


def test_unsupported_videomae_pretraining_raises():
    config = T.VideoMAEConfig(**{**BASE, **VIDEOMAE}, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                              decoder_num_attention_heads=4, decoder_intermediate_size=64)
    model = T.VideoMAEForPreTraining(config)
    with pytest.raises(ValueError, match=r"hf_tome does not support VideoMAEForPreTraining: expected one of .*"
                                         r"VideoMAEForVideoClassification, VideoMAEModel"):
        hf_tome.apply(model, r=2)
    assert not hasattr(model.config, "tome")
