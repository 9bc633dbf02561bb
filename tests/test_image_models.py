"""Token merging on every supported image model class, on tiny random configs."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import IMAGE_MODELS, main_output, make_model, tokens_seen_by

import hf_tome
from hf_tome.core.schedule import merge_schedule, tokens_per_layer

ALL = list(IMAGE_MODELS)
NUM_PATCHES = 64  # 32 px / patch 4 -> 8 x 8


def _layers(model):
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.encoder.layer


def _record_tokens_in(model, pixels) -> list[int]:
    return tokens_seen_by(_layers(model), lambda: model(pixels))


@pytest.mark.compat
@pytest.mark.parametrize("name", ALL)
def test_r0_equals_unpatched(name, pixels):
    model = make_model(name)
    with torch.no_grad():
        reference = main_output(model(pixels))
        hf_tome.apply(model, hf_tome.ToMeConfig(r=0))
        patched = main_output(model(pixels))
    assert hf_tome.is_patched(model)
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("r,inflect", [(8, 0.0), (12, -1.0), (100, 0.0)])
def test_token_counts_follow_schedule_and_clamp(name, r, inflect, pixels):
    model = make_model(name)
    protected = IMAGE_MODELS[name][3]
    hf_tome.apply(model, r=r, inflect=inflect)
    expected = tokens_per_layer(NUM_PATCHES + protected, merge_schedule(r, 4, inflect), protected)
    assert _record_tokens_in(model, pixels) == expected[:4]
    assert hf_tome.compute_report(model).tokens_in == expected[:4]
    if r == 100:  # clamped to half of the unprotected tokens every layer
        assert expected == [64 + protected, 32 + protected, 16 + protected, 8 + protected, 4 + protected]


def test_explicit_schedule_numbers():
    assert merge_schedule(16, 12, -1.0) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert merge_schedule(4, 3, 0.0) == [4, 4, 4]
    assert merge_schedule([3, 2], 4) == [3, 2, 0, 0]
    with pytest.raises(ValueError, match="r has 5 entries but the model has 4 layers"):
        merge_schedule([1, 1, 1, 1, 1], 4)


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2-reg"])
def test_protected_tokens_stay_in_place(name, pixels):
    model = make_model(name)
    protected = IMAGE_MODELS[name][3]
    hf_tome.apply(model, r=10, trace_source=True)
    with torch.no_grad():
        out = model(pixels)
    num_tokens = out.last_hidden_state.shape[1]
    assert num_tokens == 64 + protected - 40
    source = out.token_source
    # Protected token i is still at position i, holds only itself, and has size 1.
    assert torch.equal(source[:, :protected, :protected], torch.eye(protected).expand(4, -1, -1))
    assert source[:, :protected, protected:].sum() == 0
    assert source[:, protected:, :protected].sum() == 0
    assert torch.equal(out.token_sizes[:, :protected], torch.ones(4, protected, 1))
    # Every original token is held by exactly one output token; sizes count them.
    assert torch.equal(source.sum(1), torch.ones(4, 64 + protected))
    assert torch.equal(source.sum(-1, keepdim=True), out.token_sizes)
    # Positions agree with sources, so unmerging restores a full grid.
    assert torch.equal(source.argmax(1), out.token_positions)
    assert hf_tome.unmerge(out.last_hidden_state, out.token_positions).shape == (4, 64 + protected, 32)


@pytest.mark.compat
@pytest.mark.parametrize("name", ALL)
def test_remove_restores_original_forward(name, pixels):
    model = make_model(name)
    stock_classes = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        reference = main_output(model(pixels))
        hf_tome.apply(model, r=8)
        merged = main_output(model(pixels))
        hf_tome.remove(model)
        restored = main_output(model(pixels))
    assert not torch.equal(merged, reference)
    assert {n: type(m) for n, m in model.named_modules()} == stock_classes
    assert not hasattr(model.config, "tome")
    assert torch.equal(restored, reference)
    hf_tome.remove(model)  # removing again (an unpatched model) changes nothing
    assert {n: type(m) for n, m in model.named_modules()} == stock_classes
    with torch.no_grad():
        assert torch.equal(main_output(model(pixels)), reference)


@pytest.mark.compat
@pytest.mark.parametrize("name", ["vit-cls", "deit-teacher", "dinov2-reg-cls"])
def test_save_load_round_trip(name, pixels, tmp_path):
    model = make_model(name)
    hf_tome.apply(model, r=6, inflect=-0.5, prop_attn=False)
    model.save_pretrained(tmp_path)
    reloaded = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.tome_config == hf_tome.ToMeConfig(r=6, inflect=-0.5, prop_attn=False)
    assert type(reloaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(main_output(reloaded(pixels)), main_output(model(pixels)), atol=1e-6, rtol=0)
    # Keywords override the saved section; plain transformers loads the same weights unmerged.
    overridden = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path, tome_r=2)
    assert overridden.tome_config.r == 2 and overridden.tome_config.inflect == -0.5
    plain = T.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(plain).__name__ == IMAGE_MODELS[name][0].__name__
    hf_tome.remove(model)
    with torch.no_grad():
        torch.testing.assert_close(main_output(plain(pixels)), main_output(model(pixels)), atol=1e-6, rtol=0)


def test_base_model_auto_class_and_tome_config_keyword(tmp_path, pixels):
    make_model("dinov2").save_pretrained(tmp_path)
    model = hf_tome.AutoModel.from_pretrained(tmp_path, tome_config=hf_tome.ToMeConfig(r=5))
    assert type(model).__name__ == "ToMeDinov2Model"
    assert model.tome_compute().tokens_in == [65, 60, 55, 50]
    with pytest.raises(ValueError, match=r"unknown ToMeConfig field\(s\) \['colour'\]"):
        hf_tome.AutoModel.from_pretrained(tmp_path, tome_colour=1)


@pytest.mark.compat
@pytest.mark.parametrize("name", ALL)
def test_batch_invariance(name, pixels):
    model = make_model(name)
    hf_tome.apply(model, r=9)
    with torch.no_grad():
        batched = main_output(model(pixels))
        single = torch.cat([main_output(model(pixels[i : i + 1])) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


@pytest.mark.compat
@pytest.mark.parametrize("name", ["vit-cls", "deit-teacher", "dinov2-cls", "dinov2-reg"])
def test_eager_equals_sdpa_with_proportional_attention(name, pixels):
    sdpa, eager = make_model(name, "sdpa"), make_model(name, "eager")
    for model in (sdpa, eager):
        hf_tome.apply(model, r=8, prop_attn=True)
    with torch.no_grad():
        torch.testing.assert_close(main_output(sdpa(pixels)), main_output(eager(pixels)), atol=1e-5, rtol=0)


def test_proportional_attention_changes_outputs(pixels):
    with_prop, without = make_model("vit-cls"), make_model("vit-cls")
    hf_tome.apply(with_prop, r=8, prop_attn=True)
    hf_tome.apply(without, r=8, prop_attn=False)
    with torch.no_grad():
        assert (with_prop(pixels).logits - without(pixels).logits).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["vit-cls", "deit-teacher", "dinov2-reg-cls"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_in_train_mode(name, checkpointing, pixels):
    model = make_model(name)
    hf_tome.apply(model, r=8)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    labels = torch.tensor([0, 1, 2, 3])
    loss = model(pixels, labels=labels).loss if name != "deit-teacher" else model(pixels).logits.sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and "mask_token" not in n]
    assert missing == []
    assert model.base_model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_gradients(pixels):
    grads = []
    for checkpointing in (False, True):
        model = make_model("vit-cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        hf_tome.apply(model, r=8)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(pixels, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        grads.append(model.vit.embeddings.patch_embeddings.projection.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_unsupported_model_lists_supported():
    model = T.ViTForMaskedImageModeling(T.ViTConfig(**{k: v for k, v in make_model("vit").config.to_dict().items()
                                                       if k in ("hidden_size", "num_hidden_layers", "image_size",
                                                                "patch_size", "num_attention_heads")}))
    with pytest.raises(ValueError, match=r"hf_tome does not support ViTForMaskedImageModeling: expected one of "
                                         r".*DeiTForImageClassification, .*ViTModel"):
        hf_tome.apply(model, r=4)


@pytest.mark.compat
def test_output_hidden_states_and_return_dict_false(pixels):
    model = make_model("dinov2-cls")
    hf_tome.apply(model, r=8)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
        as_tuple = model(pixels, return_dict=False)
    assert [h.shape[1] for h in out.hidden_states] == [65, 57, 49, 41, 33]
    torch.testing.assert_close(as_tuple[0], out.logits)
