"""Edges of the config and of the entry points: ToMe's (r, inflect) notation, unknown fields and extra keys, kept
counts above the tokens entering a layer, compiled models, and models hf_tome does not support."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as T
from conftest import main_output, make_model

import hf_tome
from hf_tome import ToMeConfig
from hf_tome.integration.budget_table import FULL_GFLOPS_KEY, IMAGE_SIZE_KEY
from hf_tome.integration.patch import tome_config_of

FIELDS = ("['budget', 'budget_table', 'extra', 'inflect', 'merge_kept', 'merge_match', 'merge_mode', 'merge_rule', "
          "'prop_attn', 'prune_kept', 'prune_matched_layers', 'r', 'trace_source']")


# ToMe's (r, inflect) notation.

def test_tuple_r_is_tomes_r_and_inflect_pair():
    config = ToMeConfig(r=(16, -1))
    assert (config.r, config.inflect) == (16, -1.0) and isinstance(config.inflect, float)
    assert config == ToMeConfig(r=16, inflect=-1.0)
    assert config.to_dict()["r"] == 16 and config.to_dict()["inflect"] == -1.0
    assert ToMeConfig.from_json_string(config.to_json_string()) == config
    assert ToMeConfig(r=(16, -1), inflect=-1.0) == config  # the same inflect twice is fine
    assert ToMeConfig((8, 0.5)) == ToMeConfig(r=8, inflect=0.5)  # positional too
    assert ToMeConfig(r=(0, 0)) == ToMeConfig()


def test_list_r_stays_a_per_layer_schedule():
    config = ToMeConfig(r=[16, 1])
    assert (config.r, config.inflect) == ([16, 1], 0.0)


@pytest.mark.parametrize("r", [(1, 2), (16,), (16, -1, 0), (-1, 0), (1.5, 0), (True, 0), (4, "x"), (4, None)])
def test_bad_pairs_raise(r):
    message = (f"ToMeConfig.r={r!r} is invalid: expected an (r, inflect) pair of an int r >= 0 and a number inflect "
               "in [-1, 1] (a list gives one r per layer)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ToMeConfig(r=r)


@pytest.mark.parametrize("inflect", [0.0, 0.5])
def test_pair_and_a_different_inflect_raise_naming_both(inflect):
    message = (f"ToMeConfig.r=(16, -1) sets inflect=-1, but inflect={inflect} is given too: expected one of the two "
               f"(r=(16, -1), or r=16 with inflect={inflect})")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ToMeConfig(r=(16, -1), inflect=inflect)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        hf_tome.apply(make_model("vit"), r=(16, -1), inflect=inflect)


def test_apply_and_replace_take_the_pair():
    model = hf_tome.apply(make_model("vit"), r=(8, -1))
    expected = hf_tome.compute_report(hf_tome.apply(make_model("vit"), r=8, inflect=-1.0)).tokens_in
    assert hf_tome.compute_report(model).tokens_in == expected == [65, 49, 39, 34]
    assert model.config.tome["r"] == 8 and model.config.tome["inflect"] == -1.0
    # The pair's inflect replaces the one of the config it overrides.
    base = ToMeConfig(r=2, inflect=0.5, prop_attn=False)
    assert hf_tome.apply(model, base, r=(8, -1)).tome_config == ToMeConfig(r=8, inflect=-1.0, prop_attn=False)
    assert base.replace(r=(4, 1)) == ToMeConfig(r=4, inflect=1.0, prop_attn=False)
    assert base.replace(r=3) == ToMeConfig(r=3, inflect=0.5, prop_attn=False)


def test_from_pretrained_takes_the_pair_and_saves_it_as_r_and_inflect(tmp_path, pixels):
    make_model("vit-cls").save_pretrained(tmp_path / "stock")
    model = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path / "stock", tome_r=(8, -1)).eval()
    assert model.tome_config == ToMeConfig(r=8, inflect=-1.0)
    model.save_pretrained(tmp_path / "tome")
    reloaded = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path / "tome").eval()
    assert reloaded.tome_config == ToMeConfig(r=8, inflect=-1.0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, model(pixels).logits)


def test_server_budget_with_an_inflect_still_parses():
    from hf_tome_server.budgets import parse_budgets

    budget = parse_budgets(make_model("vit-cls"), ["dec=r:8,-1"])["dec"]
    assert budget.config == ToMeConfig(r=(8, -1))
    assert budget.tokens_per_layer == [65, 49, 39, 34]


# Unknown fields.

@pytest.mark.parametrize("build", [
    lambda: ToMeConfig(foo=1),
    lambda: ToMeConfig(4, foo=1),
    lambda: ToMeConfig.from_dict({"r": 4, "foo": 1}),
    lambda: ToMeConfig().replace(foo=1),
    lambda: hf_tome.apply(make_model("vit"), foo=1),
])
def test_unknown_fields_raise_listing_the_fields(build):
    message = f"unknown ToMeConfig field(s) ['foo']: expected some of {FIELDS}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build()


def test_several_unknown_fields_are_named_sorted_and_positional_use_works():
    with pytest.raises(ValueError, match=re.escape("unknown ToMeConfig field(s) ['bar', 'foo']: expected some of")):
        ToMeConfig(foo=1, bar=2)
    assert ToMeConfig(4, 0.5, False) == ToMeConfig(r=4, inflect=0.5, prop_attn=False)


def test_from_pretrained_with_an_unknown_tome_keyword_raises(tmp_path):
    make_model("vit").save_pretrained(tmp_path)
    message = f"unknown ToMeConfig field(s) ['foo']: expected some of {FIELDS}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        hf_tome.AutoModel.from_pretrained(tmp_path, tome_foo=1)


# Keys of ToMeConfig.extra.

@pytest.mark.parametrize("name,family", [("vit", "vit"), ("deit-cls", "deit"), ("dinov2-reg", "dinov2")])
@pytest.mark.parametrize("extra", [{"foo": 1}, {"foo": 1, "swin_merge_mlp": True}])
def test_unknown_extra_keys_raise_naming_key_and_family(name, family, extra):
    model = make_model(name)
    message = (f"ToMeConfig.extra has unknown key(s) {sorted(extra)} for the {family} adapter: expected some of "
               "['budget_full_gflops', 'budget_image_size']")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        hf_tome.apply(model, extra=extra)
    assert not hf_tome.is_patched(model)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        hf_tome.apply(model, ToMeConfig(extra=extra))


def test_budget_keys_are_accepted_for_every_family():
    extra = {FULL_GFLOPS_KEY: 1.0, IMAGE_SIZE_KEY: [32, 32]}
    assert hf_tome.apply(make_model("vit"), extra=extra).tome_config.extra == extra


# Kept counts above the tokens entering a layer.

def test_prune_kept_above_the_tokens_entering_a_layer_raises_at_apply():
    model = make_model("vit")
    message = ("ToMeConfig.prune_kept=[65, 60, 55, 40] is invalid: layer 2 keeps 55 tokens, but only "
               "merge_kept[1]=50 enter it; expected prune_kept[2] <= 50")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        hf_tome.apply(model, prune_kept=[65, 60, 55, 40], merge_kept=[65, 50, 45, 30])
    assert not hf_tome.is_patched(model)
    hf_tome.apply(model, prune_kept=[65, 60, 50, 40], merge_kept=[65, 50, 45, 30])  # = merge_kept[1] is fine


def test_blocks_compressed_by_dcvit_carry_the_count_before_the_check():
    from hf_tome.dcvit import blocks

    model = make_model("vit")
    blocks.compress_layer(blocks.encoder_layers(model)[2], 20)
    blocks.record_compression(model, method="dc-vit")
    # Layer 2 has no attention: it keeps what enters it (50), whatever its counts say; layer 3 gets those 50.
    hf_tome.apply(model, prune_kept=[65, 60, 55, 40], merge_kept=[65, 50, 45, 30])
    report = hf_tome.compute_report(model)
    assert (report.tokens_in, report.tokens_out) == ([65, 65, 50, 50], [65, 50, 50, 30])


@pytest.mark.parametrize("name", ["vit-cls", "dinov2-cls"])
def test_prune_kept0_above_the_input_tokens_raises_at_run_time(name):
    model = hf_tome.apply(make_model(name), prune_kept=[65, 60, 50, 40], merge_kept=[65, 50, 45, 30])
    message = ("ToMeConfig.prune_kept[0]=65 is invalid for this input: it has 17 tokens entering the model (e.g. an "
               "image of another size than the kept counts were made for); expected prune_kept[0] <= 17")
    kwargs = {"interpolate_pos_encoding": True} if name == "vit-cls" else {}
    with torch.no_grad(), pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model(torch.randn(1, 3, 16, 16), **kwargs)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 5)


# torch.compile.

@pytest.mark.slow  # about 10 s: four dynamo traces
def test_apply_and_remove_go_through_a_compiled_model(pixels):
    # backend="eager": dynamo's tracing and guards without inductor's code generation (minutes on a small CPU).
    eager = make_model("vit-cls", num_hidden_layers=2)
    compiled = torch.compile(make_model("vit-cls", num_hidden_layers=2), backend="eager")
    with torch.no_grad():
        stock = main_output(eager(pixels))
        torch.testing.assert_close(main_output(compiled(pixels)), stock, atol=0, rtol=0)
        assert hf_tome.apply(compiled, r=(8, -1)) is compiled
        hf_tome.apply(eager, r=(8, -1))
        assert hf_tome.is_patched(compiled) and hf_tome.is_patched(compiled._orig_mod)
        # Dynamo guards on the module classes and on the plan: the swap (and a new plan) recompile by themselves.
        patched = main_output(eager(pixels))
        assert not torch.allclose(patched, stock)
        torch.testing.assert_close(main_output(compiled(pixels)), patched, atol=0, rtol=0)
        assert hf_tome.compute_report(compiled).tokens_in == hf_tome.compute_report(eager).tokens_in == [65, 49]
        assert tome_config_of(compiled) == compiled.tome_config == ToMeConfig(r=8, inflect=-1.0)
        compiled.set_tome(r=2)  # the mixin, reached through the wrapper, re-configures the module it wraps
        hf_tome.apply(eager, r=2)
        torch.testing.assert_close(main_output(compiled(pixels)), main_output(eager(pixels)), atol=0, rtol=0)
        assert hf_tome.remove(compiled) is compiled
        assert not hf_tome.is_patched(compiled) and tome_config_of(compiled) is None
        torch.testing.assert_close(main_output(compiled(pixels)), stock, atol=0, rtol=0)


# Models hf_tome does not support.

def _bert() -> torch.nn.Module:
    config = T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32)
    return T.BertModel(config).eval()


@pytest.mark.parametrize("build", [_bert, lambda: torch.nn.Linear(2, 2)])
def test_unsupported_models_are_not_patched_and_remove_leaves_them_alone(build):
    model = build()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert hf_tome.is_patched(model) is False
    assert tome_config_of(model) is None
    assert hf_tome.remove(model) is model
    assert type(model) is type(build())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    message = f"hf_tome does not support {type(model).__name__}: expected one of ASTForAudioClassification, ASTModel"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        hf_tome.apply(model, r=2)
    compiled = torch.compile(model, backend="eager")
    assert hf_tome.is_patched(compiled) is False and hf_tome.remove(compiled) is compiled
