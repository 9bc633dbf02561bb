"""Reduction plans as values: ``model(x, tome_plan=plan)`` runs another plan for one call, on every family.

Each family is a tiny random model built from a config (no Hub access). The reference for a plan is always a
deep copy of the same model patched with ``hf_tome.apply(copy, config)`` and called without the keyword.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
import transformers as T
from conftest import make_model

import hf_tome
from hf_tome import ToMeConfig
from hf_tome.adapters.swin import SwinReductionPlan
from hf_tome.core.plan import ReductionPlan
from hf_tome.integration.flops import constant_r_for_macs, constant_r_for_reductions

# Tiny configs of the families that conftest does not build (same sizes as their own test modules).
BASE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, num_labels=5)
AST = dict(max_length=32, num_mel_bins=16, patch_size=4, frequency_stride=3, time_stride=4)  # 40 patches + 2
VIDEOMAE = dict(num_frames=6, image_size=12, patch_size=4, tubelet_size=2)  # 27 tubelets
VIVIT = dict(num_frames=4, image_size=16, tubelet_size=[2, 4, 4])  # 32 tubelets + 1
SWIN = dict(image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
            window_size=4, mlp_ratio=2.0, num_labels=5)  # windows of 16 tokens
WHISPER = dict(vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
               max_source_positions=32, max_target_positions=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)  # 32 encoder tokens

OTHER_MODELS = {
    "swin": (T.SwinModel, T.SwinConfig, SWIN),
    "swin-cls": (T.SwinForImageClassification, T.SwinConfig, SWIN),
    "ast-cls": (T.ASTForAudioClassification, T.ASTConfig, {**BASE, **AST}),
    "videomae-cls": (T.VideoMAEForVideoClassification, T.VideoMAEConfig, {**BASE, **VIDEOMAE}),
    "vivit-cls": (T.VivitForVideoClassification, T.VivitConfig, {**BASE, **VIVIT}),
    "whisper-encoder": (T.models.whisper.modeling_whisper.WhisperEncoder, T.WhisperConfig, WHISPER),
    "whisper-model": (T.WhisperModel, T.WhisperConfig, WHISPER),
    "whisper-generation": (T.WhisperForConditionalGeneration, T.WhisperConfig, WHISPER),
}
INPUT_SHAPES = {"swin": (3, 32, 32), "swin-cls": (3, 32, 32), "ast-cls": (32, 16), "videomae-cls": (6, 3, 12, 12),
                "vivit-cls": (4, 3, 16, 16), "whisper-encoder": (16, 64), "whisper-model": (16, 64),
                "whisper-generation": (16, 64)}
# Classes whose forward needs decoder ids next to the input.
SEQ2SEQ = {"whisper-model", "whisper-generation"}


def build(name: str) -> torch.nn.Module:
    """A tiny random float32 model in eval mode; learned tokens and biases that stock init leaves at zero (or
    near it) are randomised, so a plan that merged the wrong tokens would show in the outputs."""
    if name not in OTHER_MODELS:
        return make_model(name)
    model_class, config_class, extra = OTHER_MODELS[name]
    config = config_class(**extra)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(("cls_token", "distillation_token", "position_embeddings",
                                    "relative_position_bias_table")):
                param.normal_(0, 0.5)
    return model


def inputs(name: str, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    shape = INPUT_SHAPES.get(name, (3, 32, 32))
    return torch.randn(batch, *shape)


def decoder_ids(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.randint(3, 100, (batch, 5))], dim=1)


def call(model: torch.nn.Module, name: str, x: torch.Tensor, **kwargs):
    with torch.no_grad():
        if name in SEQ2SEQ:
            return model(x, decoder_input_ids=decoder_ids(x.shape[0]), **kwargs)
        return model(x, **kwargs)


OUTPUT_FIELDS = ("logits", "last_hidden_state", "pooler_output", "token_sizes", "token_positions",
                 "encoder_last_hidden_state", "encoder_token_sizes")


def tensors(output) -> dict[str, torch.Tensor]:
    """Every tensor field of an output a plan can change (the main output, and the sizes where there are some)."""
    return {field: getattr(output, field) for field in OUTPUT_FIELDS if getattr(output, field, None) is not None}


def assert_same(got, expected) -> None:
    got, expected = tensors(got), tensors(expected)
    assert got.keys() == expected.keys()
    for field, tensor in expected.items():
        torch.testing.assert_close(got[field], tensor, atol=1e-6, rtol=0, msg=lambda m, f=field: f"{f}: {m}")


def differs(a, b) -> bool:
    """True when the main outputs differ in shape or by more than float noise."""
    a, b = tensors(a), tensors(b)
    main = next(field for field in OUTPUT_FIELDS if field in a)
    return a[main].shape != b[main].shape or (a[main] - b[main]).abs().max().item() > 1e-4


# (model, config of the plan): every family, classification heads where the family has one (the keyword must pass
# through the stock head untouched), the prune + merge settings on ViT and the Swin-only settings.
PLAN_CASES = {
    "vit-cls:r": ("vit-cls", ToMeConfig(r=6)),
    "vit:r-inflect": ("vit", ToMeConfig(r=8, inflect=-1.0)),
    "vit-cls:prune-merge": ("vit-cls", ToMeConfig(prune_kept=[65, 40, 30, 20], merge_kept=[65, 33, 24, 16])),
    "vit:prune-merge-bipartite": ("vit", ToMeConfig(prune_kept=[65, 50, 40, 30], merge_kept=[65, 45, 35, 25],
                                                    merge_match="bipartite")),
    "deit-teacher:r": ("deit-teacher", ToMeConfig(r=6)),
    "dinov2-cls:r": ("dinov2-cls", ToMeConfig(r=6)),
    "dinov2-reg-cls:r": ("dinov2-reg-cls", ToMeConfig(r=5)),
    "swin-cls:r": ("swin-cls", ToMeConfig(r=4)),
    "swin:stage-r-merge-mlp": ("swin", ToMeConfig(extra={"swin_stage_r": [6, 3], "swin_merge_mlp": True})),
    "ast-cls:r": ("ast-cls", ToMeConfig(r=6)),
    "videomae-cls:r": ("videomae-cls", ToMeConfig(r=4)),
    "vivit-cls:r": ("vivit-cls", ToMeConfig(r=5)),
    "whisper-encoder:r": ("whisper-encoder", ToMeConfig(r=6)),
    "whisper-model:r": ("whisper-model", ToMeConfig(r=6)),
    "whisper-generation:r": ("whisper-generation", ToMeConfig(r=6, prop_attn=False)),
}


@pytest.mark.compat
@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_plan_keyword_equals_an_applied_copy_and_leaves_no_state(case: str) -> None:
    name, config = PLAN_CASES[case]
    model = build(name)
    applied = hf_tome.apply(copy.deepcopy(model), config)
    x = inputs(name)
    stock = call(model, name, x)
    hf_tome.apply(model, ToMeConfig(r=0))
    plan = hf_tome.build_plan(model, config)
    assert type(plan) is (SwinReductionPlan if name.startswith("swin") else ReductionPlan)
    default_plan = hf_tome.build_plan(model, ToMeConfig(r=0))
    unmerged = call(model, name, x)
    assert_same(unmerged, stock)

    merged = call(model, name, x, tome_plan=plan)
    assert_same(merged, call(applied, name, x))
    assert differs(merged, unmerged)  # the plan did change this forward

    after = call(model, name, x)  # and only that one: the next call runs the default plan again, bit for bit
    for field, tensor in tensors(unmerged).items():
        assert torch.equal(tensors(after)[field], tensor), field
    assert hf_tome.build_plan(model, ToMeConfig(r=0)) == default_plan
    assert hf_tome.integration.patch.tome_config_of(model) == ToMeConfig(r=0)


def _generate(model, features, **kwargs):
    with torch.no_grad():
        return model.generate(features, max_new_tokens=4, do_sample=False, num_beams=1, return_dict_in_generate=True,
                              output_scores=True, **kwargs)


@pytest.mark.compat
def test_whisper_generate_takes_a_plan() -> None:
    """``generate(..., tome_plan=plan)`` passes transformers' model-kwargs validation and decodes like an applied copy
    (the encoder merges with the plan, and the decoder's cross-attention reads its sizes at every step)."""
    model = build("whisper-generation")
    config = ToMeConfig(r=6, prop_attn=False)  # the decoder must read prop_attn off this plan, not the default's
    applied = hf_tome.apply(copy.deepcopy(model), config)
    hf_tome.apply(model, ToMeConfig(r=0))
    features = inputs("whisper-generation")
    unmerged = _generate(model, features)
    expected = _generate(applied, features)
    got = _generate(model, features, tome_plan=hf_tome.build_plan(model, config))
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == 4
    for step_got, step_expected in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(step_got, step_expected, atol=1e-6, rtol=0)
    assert (got.scores[0] - unmerged.scores[0]).abs().max() > 1e-4  # the plan was used
    again = _generate(model, features)
    for step_again, step_unmerged in zip(again.scores, unmerged.scores, strict=True):
        assert torch.equal(step_again, step_unmerged)


# Token counts.

def _base_output(model, name: str, x: torch.Tensor, plan: ReductionPlan):
    """The encoder output (with its token sizes) of ``model`` under ``plan``."""
    with torch.no_grad():
        if name.startswith("whisper"):
            return model.get_encoder()(x, tome_plan=plan) if name != "whisper-encoder" else model(x, tome_plan=plan)
        return model.base_model(x, tome_plan=plan)


@pytest.mark.parametrize("case", [case for case in PLAN_CASES if not case.startswith("swin")])
def test_output_tokens_match_compute_report(case: str) -> None:
    name, config = PLAN_CASES[case]
    model = hf_tome.apply(build(name))
    x = inputs(name)
    entering = hf_tome.compute_report(model).tokens_in[0]
    for plan_config in (ToMeConfig(r=0), config, ToMeConfig(r=2)):
        plan = hf_tome.build_plan(model, plan_config)
        report = hf_tome.compute_report(model, plan=plan)
        assert report.tokens_in[0] == entering
        output = _base_output(model, name, x, plan)
        assert output.last_hidden_state.shape[1] == report.tokens_out[-1]
        if output.token_sizes is None:  # nothing merged
            assert report.tokens_out[-1] == entering
            continue
        assert output.token_sizes.shape[1] == report.tokens_out[-1] < entering
        sums = output.token_sizes.sum(dim=1).flatten().tolist()
        if plan.prune_kept is None:  # merging keeps every original token exactly once
            assert sums == [entering] * x.shape[0]
        else:  # pruning drops tokens, and their sizes with them
            assert all(total < entering for total in sums)
    assert hf_tome.compute_report(model, plan=hf_tome.build_plan(model, config)).tokens_out[-1] < entering


def test_swin_attention_tokens_match_compute_report() -> None:
    """Swin unmerges in every layer: its report counts the tokens each window attention runs on, over all windows."""
    model = hf_tome.apply(build("swin-cls"))
    attentions = [m for m in model.modules() if isinstance(m, T.models.swin.modeling_swin.SwinAttention)]
    seen: list[int] = []
    hooks = [a.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0] * args[0].shape[1]))
             for a in attentions]
    x = inputs("swin-cls", batch=1)
    try:
        for config in (ToMeConfig(r=4), ToMeConfig(extra={"swin_stage_r": [6, 3]})):
            seen.clear()
            plan = hf_tome.build_plan(model, config)
            with torch.no_grad():
                model(x, tome_plan=plan)
            assert seen == hf_tome.compute_report(model, plan=plan).tokens_in
            assert seen != hf_tome.compute_report(model).tokens_in  # the default (r=0) counts every token
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("case", ["vit-cls:r", "vit-cls:prune-merge", "swin:stage-r-merge-mlp", "ast-cls:r",
                                  "whisper-generation:r"])
def test_compute_report_of_a_config_equals_the_applied_report_and_patches_nothing(case: str) -> None:
    name, config = PLAN_CASES[case]
    model = build(name)
    report = hf_tome.compute_report(model, config=config)
    assert not hf_tome.is_patched(model)
    assert not hasattr(model.config, "tome")
    applied = hf_tome.compute_report(hf_tome.apply(copy.deepcopy(model), config))
    assert report.to_dict() == applied.to_dict()
    assert report.total_macs < hf_tome.compute_report(model).total_macs
    assert hf_tome.compute_report(model, plan=hf_tome.build_plan(model, config)).to_dict() == report.to_dict()


# Immutability.

def test_plans_are_frozen_values() -> None:
    model = make_model("vit-cls")
    plan = hf_tome.build_plan(model, ToMeConfig(r=[4, 3, 2, 1]))
    assert plan.layer_r == (4, 3, 2, 1) and isinstance(plan.layer_r, tuple)
    for field, value in [("layer_r", (0, 0, 0, 0)), ("protected", 0), ("prop_attn", False)]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(plan, field, value)
    assert plan.layer_r == (4, 3, 2, 1) and plan.protected == 1 and plan.prop_attn

    made = ReductionPlan(layer_r=[1, 2], protected=1, prune_kept=[9, 8], merge_kept=[9, 7])
    assert (made.layer_r, made.prune_kept, made.merge_kept) == ((1, 2), (9, 8), (9, 7))
    assert all(isinstance(value, tuple) for value in (made.layer_r, made.prune_kept, made.merge_kept))

    assert hf_tome.build_plan(model, ToMeConfig(r=4)) == hf_tome.build_plan(make_model("vit-cls"), ToMeConfig(r=4))
    assert hash(hf_tome.build_plan(model, ToMeConfig(r=4))) == hash(hf_tome.build_plan(model, ToMeConfig(r=4)))
    assert hf_tome.build_plan(model, ToMeConfig(r=4)) != hf_tome.build_plan(model, ToMeConfig(r=5))
    kept = dict(prune_kept=[65, 40, 30, 20], merge_kept=[65, 33, 24, 16])
    pruning = hf_tome.build_plan(model, ToMeConfig(**kept))
    assert pruning == hf_tome.build_plan(model, ToMeConfig(**kept))
    assert pruning.prune_kept == (65, 40, 30, 20) and pruning.merge_kept == (65, 33, 24, 16)

    swin = build("swin")
    swin_plan = hf_tome.build_plan(swin, ToMeConfig(extra={"swin_stage_r": [6, 3]}))
    assert swin_plan.depths == (2, 2) and swin_plan.layer_r == (6, 6, 3, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        swin_plan.merge_mlp = True
    assert swin_plan == hf_tome.build_plan(swin, ToMeConfig(extra={"swin_stage_r": [6, 3]}))


def test_a_running_model_does_not_change_the_plans_it_is_given() -> None:
    model = hf_tome.apply(make_model("vit-cls"), r=2)
    default = hf_tome.integration.registry.find_adapter(model).loop_module(model)._tome_plan
    plan = hf_tome.build_plan(model, ToMeConfig(prune_kept=[65, 40, 30, 20], merge_kept=[65, 33, 24, 16]))
    before = dataclasses.astuple(plan)
    call(model, "vit-cls", inputs("vit-cls"), tome_plan=plan)
    assert dataclasses.astuple(plan) == before
    assert hf_tome.integration.registry.find_adapter(model).loop_module(model)._tome_plan is default


# Bad input.

def test_a_plan_of_the_wrong_type_is_refused_with_its_message() -> None:
    vit = hf_tome.apply(make_model("vit-cls"))
    x = inputs("vit-cls")
    with pytest.raises(TypeError) as raised:
        call(vit, "vit-cls", x, tome_plan={"layer_r": [2, 2, 2, 2], "protected": 1})
    assert str(raised.value) == ("tome_plan=dict is invalid for ToMeViTModel: expected a ReductionPlan made by "
                                 "hf_tome.build_plan(model, config) for this model")

    swin = hf_tome.apply(build("swin-cls"))
    vit_plan = hf_tome.build_plan(vit, ToMeConfig(r=2))  # 4 layers, as many as the tiny Swin
    with pytest.raises(TypeError) as raised:
        call(swin, "swin-cls", inputs("swin-cls"), tome_plan=vit_plan)
    assert str(raised.value) == ("tome_plan=ReductionPlan is invalid for ToMeSwinEncoder: expected a "
                                 "SwinReductionPlan made by hf_tome.build_plan(model, config) for this model")

    swin_plan = hf_tome.build_plan(swin, ToMeConfig(r=2))  # a subclass of ReductionPlan, but not ViT's plan
    with pytest.raises(TypeError) as raised:
        call(vit, "vit-cls", x, tome_plan=swin_plan)
    assert str(raised.value) == ("tome_plan=SwinReductionPlan is invalid for ToMeViTModel: expected a "
                                 "ReductionPlan made by hf_tome.build_plan(model, config) for this model")


def test_a_plan_with_the_wrong_number_of_layers_is_refused() -> None:
    model = hf_tome.apply(make_model("vit-cls"))
    deeper = hf_tome.build_plan(make_model("vit-cls", num_hidden_layers=6), ToMeConfig(r=2))
    with pytest.raises(ValueError, match=r"^the reduction plan has 6 layers but the encoder has 4$"):
        call(model, "vit-cls", inputs("vit-cls"), tome_plan=deeper)
    whisper = hf_tome.apply(build("whisper-encoder"))
    with pytest.raises(ValueError, match=r"^the reduction plan has 4 layers but the encoder has 2$"):
        call(whisper, "whisper-encoder", inputs("whisper-encoder"), tome_plan=ReductionPlan((1, 1, 1, 1), 0))
    # the model still answers with its own plan afterwards
    assert call(model, "vit-cls", inputs("vit-cls")).logits.shape == (2, 5)


def test_a_plan_made_for_other_protected_tokens_is_refused() -> None:
    """A ViT plan (1 protected token) on DeiT (class + distillation) would merge the distillation token away."""
    deit = hf_tome.apply(build("deit-teacher"))
    vit_plan = hf_tome.build_plan(make_model("vit-cls"), ToMeConfig(r=2))
    assert vit_plan.num_layers == deit.config.num_hidden_layers  # only the protected count tells them apart
    with pytest.raises(ValueError, match=r"^tome_plan protects 1 token\(s\) but ToMeDeiTModel has 2: expected a plan "
                                         r"made by hf_tome.build_plan\(model, config\) for this model$"):
        call(deit, "deit-teacher", inputs("deit-teacher"), tome_plan=vit_plan)


# Concurrency.

def test_two_threads_share_one_model_with_their_own_plans() -> None:
    model = hf_tome.apply(make_model("vit-cls"))
    plans = {"A": hf_tome.build_plan(model, ToMeConfig(r=0)), "B": hf_tome.build_plan(model, ToMeConfig(r=8))}
    torch.manual_seed(3)
    batches = {"A": torch.randn(2, 3, 32, 32), "B": torch.randn(3, 3, 32, 32)}
    references = {key: call(model, "vit-cls", batches[key], tome_plan=plans[key]).logits for key in plans}
    assert (references["A"][:2] - call(model, "vit-cls", batches["A"], tome_plan=plans["B"]).logits).abs().max() > 1e-4
    start = threading.Barrier(2)
    mismatches: dict[str, list[int]] = {"A": [], "B": []}
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            start.wait()
            for step in range(20):
                logits = call(model, "vit-cls", batches[key], tome_plan=plans[key]).logits
                if not torch.allclose(logits, references[key], atol=1e-6, rtol=0):
                    mismatches[key].append(step)
        except BaseException as error:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(key,)) for key in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and mismatches == {"A": [], "B": []}
    assert hf_tome.integration.registry.find_adapter(model).loop_module(model)._tome_plan == plans["A"]


# constant_r_for_macs.

def _macs_by_r(model, image_size=None, inflect: float = 0.0) -> list[int]:
    return [hf_tome.compute_report(model, image_size, config=ToMeConfig(r=r, inflect=inflect)).total_macs
            for r in range(66)]  # 65 tokens: no larger r changes anything


@pytest.mark.parametrize("fraction", [0.95, 0.8, 0.62, 0.5])
@pytest.mark.parametrize("inflect", [0.0, -1.0])
def test_constant_r_for_macs_sides_equal_brute_force(fraction: float, inflect: float) -> None:
    model = make_model("vit-cls")
    macs = _macs_by_r(model, inflect=inflect)
    target = fraction * macs[0]
    at_most = min(r for r, m in enumerate(macs) if m <= target)
    at_least = max(r for r, m in enumerate(macs) if m >= target)
    assert macs[at_most] <= target < macs[at_most - 1]
    assert constant_r_for_macs(model, fraction, inflect=inflect) == at_most
    assert constant_r_for_macs(model, fraction, inflect=inflect, side="at_least") == at_least
    assert constant_r_for_macs(model, target, inflect=inflect) == at_most  # absolute MACs per image
    assert constant_r_for_macs(model, target, inflect=inflect, side="at_least") == at_least
    assert not hf_tome.is_patched(model)


def test_constant_r_for_macs_at_an_exact_target_and_another_image_size() -> None:
    model = make_model("vit-cls")
    macs = _macs_by_r(model)
    # a target met exactly counts as met on both sides
    assert constant_r_for_macs(model, macs[5]) == min(r for r, m in enumerate(macs) if m <= macs[5])
    assert constant_r_for_macs(model, macs[5], side="at_least") == max(r for r, m in enumerate(macs) if m >= macs[5])
    assert macs[4] > macs[5] > macs[6]
    assert constant_r_for_macs(model, macs[5]) == 5 == constant_r_for_macs(model, macs[5], side="at_least")
    larger = [hf_tome.compute_report(model, (48, 48), config=ToMeConfig(r=r)).total_macs for r in range(146)]
    expected = min(r for r, m in enumerate(larger) if m <= 0.6 * larger[0])
    assert constant_r_for_macs(model, 0.6, image_size=(48, 48)) == expected
    assert expected != constant_r_for_macs(model, 0.6)
    assert constant_r_for_reductions(model, [1 / 0.6]) == {1 / 0.6: constant_r_for_macs(model, 0.6)}


def test_constant_r_for_macs_refuses_unreachable_targets() -> None:
    model = make_model("vit-cls")
    macs = _macs_by_r(model)
    reach = macs[-1] / macs[0]
    with pytest.raises(ValueError, match=r"^MACs target 0\.01 is out of reach with constant r for this model: r=0 "
                                         rf"to 65 give {reach:.4f} to 1 of the full model's MACs$"):
        constant_r_for_macs(model, 0.01)
    assert constant_r_for_macs(model, reach) == min(r for r, m in enumerate(macs) if m <= macs[-1])
    with pytest.raises(ValueError, match=r"out of reach"):  # more MACs than the unreduced model has
        constant_r_for_macs(model, 2.0 * macs[0], side="at_least")
    with pytest.raises(ValueError, match=r"^side='both' is invalid: expected 'at_most' or 'at_least'$"):
        constant_r_for_macs(model, 0.5, side="both")
