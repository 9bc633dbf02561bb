"""Unified prune + merge on the later adapters: AST and ViViT have a class token and take kept counts; VideoMAE,
Swin and the Whisper encoder have none and refuse them with a clear error."""

from __future__ import annotations

import pytest
import torch
from conftest import main_output, mlp_norms, tokens_seen_by
from test_audio_video_models import CLASSIFIERS, LAYERS, MODELS, inputs, make
from test_swin_model import make_swin
from test_whisper_model import make_whisper

import hf_tome

WITH_CLASS_TOKEN = ["ast", "ast-cls", "vivit", "vivit-cls"]


def _tokens(name: str) -> int:
    _, _, _, patches, protected, _ = MODELS[name]
    return patches + protected


def _kept(name: str) -> tuple[list[int], list[int]]:
    """Counts every rule can reach: block 1 prunes 6 and merges 8, later blocks merge a few more."""
    total, protected = _tokens(name), MODELS[name][4]
    merge_kept = [total, total - 14, total - 20, total - 24]
    prune_kept = [total, total - 6, total - 16, total - 20]
    assert all(m >= protected + 1 for m in merge_kept)
    return prune_kept, merge_kept


def _tokens_reaching_each_mlp(model, x) -> list[int]:
    return tokens_seen_by(mlp_norms(model), lambda: model(x))


@pytest.mark.parametrize("name", WITH_CLASS_TOKEN)
def test_no_reduction_equals_unpatched(name):
    model, x = make(name), inputs(name)
    with torch.no_grad():
        reference = main_output(model(x))
        hf_tome.apply(model, prune_kept=[_tokens(name)] * LAYERS, merge_kept=[_tokens(name)] * LAYERS)
        torch.testing.assert_close(main_output(model(x)), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("merge_match", ["class_attention", "bipartite"])
@pytest.mark.parametrize("name", WITH_CLASS_TOKEN)
def test_counts_per_layer_match_the_config(name, merge_match):
    prune_kept, merge_kept = _kept(name)
    model = hf_tome.apply(make(name), prune_kept=prune_kept, merge_kept=merge_kept, merge_match=merge_match)
    assert _tokens_reaching_each_mlp(model, inputs(name)) == merge_kept
    assert hf_tome.compute_report(model).tokens_out == merge_kept


@pytest.mark.parametrize("name", ["ast", "vivit"])
def test_protected_tokens_stay_and_pruned_mass_leaves(name):
    protected = MODELS[name][4]
    prune_kept, merge_kept = _kept(name)
    model = hf_tome.apply(make(name), prune_kept=prune_kept, merge_kept=merge_kept, trace_source=True)
    x = inputs(name)
    with torch.no_grad():
        out = model(x)
    # Block 1 prunes 6 of the N entering it, block 2 prunes 2 of its N - 14, block 3 none of its N - 20: the sizes
    # add up to the N - 8 tokens that survived pruning.
    assert torch.equal(out.token_sizes.sum(1).flatten(), torch.full((len(x),), float(_tokens(name) - 8)))
    assert torch.equal(out.token_source.sum(-1, keepdim=True), out.token_sizes)
    assert torch.equal(out.token_sizes[:, :protected], torch.ones(len(x), protected, 1))
    assert torch.equal(out.token_source[:, :protected, :protected], torch.eye(protected).expand(len(x), -1, -1))
    assert out.last_hidden_state.shape == (len(x), merge_kept[-1], model.config.hidden_size)


@pytest.mark.parametrize("merge_match", ["class_attention", "bipartite"])
@pytest.mark.parametrize("name", ["ast-cls", "vivit-cls"])
def test_eager_equals_sdpa_and_batch_invariance(name, merge_match):
    prune_kept, merge_kept = _kept(name)
    settings = {"prune_kept": prune_kept, "merge_kept": merge_kept, "merge_match": merge_match}
    x = inputs(name)
    sdpa = hf_tome.apply(make(name, "sdpa"), **settings)
    eager = hf_tome.apply(make(name, "eager"), **settings)
    with torch.no_grad():
        batched = sdpa(x).logits
        torch.testing.assert_close(eager(x).logits, batched, atol=1e-5, rtol=0)
        for sample in range(len(x)):
            torch.testing.assert_close(sdpa(x[sample : sample + 1]).logits, batched[sample : sample + 1],
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ast-cls", "vivit-cls"])
def test_save_load_round_trip(name, tmp_path):
    prune_kept, merge_kept = _kept(name)
    model, x = make(name), inputs(name)
    hf_tome.apply(model, prune_kept=prune_kept, merge_kept=merge_kept, merge_match="bipartite")
    model.save_pretrained(tmp_path)
    reloaded = CLASSIFIERS[name].from_pretrained(tmp_path).eval()
    assert reloaded.tome_config.merge_kept == merge_kept and reloaded.tome_config.merge_match == "bipartite"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("build,family", [(lambda: make("videomae-cls"), "videomae"),
                                          (lambda: make_swin("swin"), "swin"), (make_whisper, "whisper")])
def test_families_without_a_class_token_refuse_kept_counts(build, family):
    model = build()
    with pytest.raises(ValueError, match=rf"ToMeConfig.prune_kept=\[9, 8\] is invalid for {type(model).__name__}: "
                                         rf"the {family} adapter does not support prune \+ merge \(its encoder has no "
                                         r"class token whose attention could rank the tokens\); expected "
                                         r"prune_kept=None \(use r for token merging\)"):
        hf_tome.apply(model, prune_kept=[9, 8], merge_kept=[9, 7])
    assert not hf_tome.is_patched(model)
