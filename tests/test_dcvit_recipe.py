"""DC-ViT's published training recipe in iterations, the time budget, the augmented teacher pool and the cached
fine-tuning loop, on tiny random models."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from accelerate import Accelerator
from conftest import make_model

import hf_tome
from hf_tome.dcvit import blocks, compress, recipe
from hf_tome.dcvit.compress import CompressOptions, run_compress, training_plan
from hf_tome.dcvit.mimic import (
    batch_loss,
    finetune_mimic,
    make_optimizer,
    make_schedule,
    mimic_loss,
    output_tokens,
    set_trainable_blocks,
)
from hf_tome.dcvit.pool import build_pool, cache_prefix, cache_teacher
from hf_tome.dcvit.stages import SuffixStudent, logits_from_tokens


def _compressed_pair(block: int = 2, layers: int = 6):
    original = make_model("dinov2-cls", num_hidden_layers=layers)
    student = copy.deepcopy(original)
    blocks.compress_layer(blocks.encoder_layers(student)[block], 20)
    return original, student


def test_defaults_follow_the_published_recipe():
    assert (recipe.RECIPE_ITERATIONS_PER_BLOCK, recipe.RECIPE_BATCH_SIZE, recipe.RECIPE_LR,
            recipe.RECIPE_WEIGHT_DECAY, recipe.RECIPE_WARMUP_EPOCHS, recipe.RECIPE_AUGMENT) == (
        2000, 64, 3e-5, 1e-4, 20, "color-jitter")
    options = CompressOptions()
    assert (options.iterations_per_block, options.batch_size, options.lr, options.weight_decay, options.augment) == (
        2000, 64, 3e-5, 1e-4, "color-jitter")
    assert options.warmup_iterations is None and options.budget_minutes is None
    assert (options.epochs_per_block, options.final_epochs, options.trial_epochs) == (None, None, None)
    # 500 images in batches of 64: 8 steps an epoch, 20 epochs = 160 warm-up steps of the 2,000
    assert recipe.warmup_iterations(2000, 500, 64) == 160
    assert recipe.warmup_iterations(100, 500, 64) == 10  # at most 10% of a short phase
    assert recipe.warmup_iterations(100, 500, 64, requested=300) == 100
    plan = training_plan(options, num_blocks=4, num_candidates=10)
    assert (plan.per_block, plan.final, plan.trial) == (2000, 0, 100)


def test_epoch_options_stay_aliases_of_iterations():
    options = CompressOptions(num_images=500, batch_size=64, epochs_per_block=2, final_epochs=0.5, trial_epochs=0.1)
    plan = training_plan(options, num_blocks=4, num_candidates=10)
    assert (plan.per_block, plan.final, plan.trial) == (2 * 7, round(0.5 * 7), 1)  # 500 // 64 = 7 full batches
    assert training_plan(CompressOptions(final_epochs=0), 1, 1).final == 0
    from hf_tome.cli.main import build_parser

    args = build_parser().parse_args(["compress", "--iterations-per-block", "300", "--budget-minutes", "30",
                                      "--warmup-iterations", "5", "--train-scope", "local", "--logits-weight", "0.5"])
    parsed = compress.options_from_args(args)
    assert (parsed.iterations_per_block, parsed.budget_minutes, parsed.warmup_iterations, parsed.train_scope,
            parsed.logits_weight) == (300, 30.0, 5, "local", 0.5)


def test_budget_scales_every_phase_by_one_factor():
    plan = recipe.TrainingPlan(per_block=2000, final=400, trial=100, num_blocks=4, num_candidates=10)
    costs = recipe.StepCosts(step=0.5, trial_step=0.1, fixed=60.0)
    assert costs.estimate(plan) == 60 + 0.5 * 8400 + 0.1 * 1000
    fitted = recipe.fit_to_budget(plan, costs, budget_seconds=60 + 0.25 * (4200 + 100))
    assert fitted.scale == pytest.approx(0.25)
    assert (fitted.per_block, fitted.final, fitted.trial) == (500, 100, 25)
    assert fitted.estimate_seconds <= 60 + 0.25 * 4300 + 1e-9
    assert "500 iterations per block x 4 blocks, 100 final, 25 per trial" in fitted.describe()
    assert "estimate" in fitted.describe() and "scaled by 0.250" in fitted.describe()
    roomy = recipe.fit_to_budget(plan, costs, budget_seconds=1e9)
    assert (roomy.per_block, roomy.final, roomy.trial, roomy.scale) == (2000, 400, 100, 1.0)  # never above the plan
    starved = recipe.fit_to_budget(plan, costs, budget_seconds=10)
    assert (starved.per_block, starved.final, starved.trial) == (1, 1, 1)


def test_step_cost_is_measured_with_the_given_clock():
    ticks = iter([0.0, 2.0, 10.0, 11.0, 20.0, 23.0])  # three timed runs: 2 s, 1 s, 3 s
    calls = []
    seconds = recipe.measure_seconds(lambda: calls.append(1), repeats=3, warmup=1, clock=lambda: next(ticks))
    assert seconds == 2.0 and len(calls) == 4


def test_budget_minutes_plans_and_prints_the_iterations(tiny_model_dir, image_folder, tmp_path, capsys,
                                                        monkeypatch):
    seen = {}

    def fake_costs(original, pool, kept_units, accelerator, options, pool_seconds, plan, steps=3):
        seen["plan"] = plan
        return recipe.StepCosts(step=1.0, trial_step=0.5, fixed=6.0)

    monkeypatch.setattr(compress, "measure_costs", fake_costs)
    options = CompressOptions(model=str(tiny_model_dir), data=str(image_folder), num_images=12, target=0.7,
                              out=tmp_path / "run", iterations_per_block=40, final_iterations=10, trial_iterations=8,
                              batch_size=4, lr=3e-4, metric_images=5, metric_steps=3, pool_copies=2,
                              budget_minutes=1.0, train_scope="local")
    summary = run_compress(options, clock=lambda: 0.0)
    # 2 blocks x 40 + 10 final at 1 s, 4 candidates x 8 trial at 0.5 s, 6 s fixed = 112 s: scaled to 60 s
    scale = (60 - 6) / (90 + 16)
    assert seen["plan"].per_block == 40
    planned = summary["training_plan"]
    assert planned["scale"] == pytest.approx(scale)
    assert (planned["per_block"], planned["final"], planned["trial"]) == (int(40 * scale), int(10 * scale),
                                                                          int(8 * scale))
    out = capsys.readouterr().out
    assert "budget 1 min: 1.000 s per step, 0.500 s per trial step" in out
    assert f"training plan: {int(40 * scale)} iterations per block x 2 blocks, {int(10 * scale)} final" in out
    assert "pool of 24 entries (2 copies, color-jitter)" in out
    losses = summary["losses"]
    assert len(losses["final"]) == int(10 * scale)
    assert all(len(losses[str(block)]) == int(40 * scale) for block in json.loads(
        (tmp_path / "run" / "state" / "progress.json").read_text())["done"])
    # the result: MACs within one MLP unit of the target, and it reloads to the same outputs
    model_dir = tmp_path / "run" / "model"
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(model_dir).eval()
    original = hf_tome.AutoModelForImageClassification.from_pretrained(tiny_model_dir).eval()
    full = hf_tome.compute_report(original).total_macs
    assert abs(hf_tome.compute_report(loaded).total_macs - 0.7 * full) <= 2 * 65 * 32
    pixels = torch.randn(2, 3, 32, 32)
    again = hf_tome.AutoModelForImageClassification.from_pretrained(model_dir).eval()
    torch.testing.assert_close(again(pixel_values=pixels).logits, loaded(pixel_values=pixels).logits)


def test_resume_with_iterations_skips_finished_blocks(tiny_model_dir, image_folder, tmp_path):
    options = CompressOptions(model=str(tiny_model_dir), data=str(image_folder), num_images=12, target=0.7,
                              out=tmp_path / "run", iterations_per_block=4, trial_iterations=2, batch_size=4,
                              lr=3e-4, metric_images=5, metric_steps=3, pool_copies=2)
    run_compress(options)
    progress = tmp_path / "run" / "state" / "progress.json"
    state = json.loads(progress.read_text())
    first, second = state["order"]
    state["done"] = [first]
    del state["losses"][str(second)]
    progress.write_text(json.dumps(state))
    summary = run_compress(dataclasses.replace(options, resume=True))
    assert summary["losses"][str(first)] == state["losses"][str(first)]  # not trained again
    assert len(summary["losses"][str(second)]) == 4


def test_augmented_pool_has_the_requested_size_and_is_deterministic():
    pixels = torch.rand(5, 3, 16, 16) * 2 - 1
    pool = build_pool(pixels, copies=4, seed=3)
    assert len(pool) == 20 and pool.images().shape == (20, 3, 16, 16)
    torch.testing.assert_close(pool.images(torch.arange(5)), pixels)  # copy 0: the images as given
    again = build_pool(pixels, copies=4, seed=3)
    torch.testing.assert_close(again.images(), pool.images())
    other = build_pool(pixels, copies=4, seed=4)
    assert not torch.allclose(other.images()[5:], pool.images()[5:])
    assert pool.augmented.sum() == 15 and not torch.allclose(pool.images()[5:10], pixels)
    plain = build_pool(pixels, copies=2, augment="none")
    torch.testing.assert_close(plain.images(), torch.cat([pixels, pixels]))
    with pytest.raises(ValueError, match="augment='blur' is invalid"):
        build_pool(pixels, augment="blur")


@pytest.mark.parametrize("scope, logits_weight", [("prefix", 0.0), ("local", 0.0), ("local", 1.0)])
def test_cached_teacher_and_prefix_give_the_uncached_loss(scope, logits_weight):
    original, student = _compressed_pair()
    torch.manual_seed(0)
    pool = build_pool(torch.randn(6, 3, 32, 32), copies=3, seed=0)
    cache_teacher(pool, original, logits=bool(logits_weight), description=None)
    indices = torch.tensor([0, 7, 13, 17])
    start = 0 if scope == "prefix" else 2
    hidden = cache_prefix(pool, student, start)
    cached = batch_loss(SuffixStudent(student, start, with_logits=bool(logits_weight)), pool, hidden, indices,
                        logits_weight)
    images = pool.images(indices)
    with torch.no_grad():  # uncached: teacher and student both run on the augmented images now
        student_tokens = student.base_model(pixel_values=images).last_hidden_state
        uncached = mimic_loss(student_tokens, output_tokens(original, images), student(pixel_values=images).logits,
                              original(pixel_values=images).logits, logits_weight)
    assert abs(cached.item() - uncached.item()) < 1e-5


def test_head_logits_match_the_stock_forward():
    for name in ("vit-cls", "deit-cls", "dinov2-cls", "dinov2-reg-cls"):
        model = make_model(name)
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            tokens = model.base_model(pixel_values=pixels).last_hidden_state
            torch.testing.assert_close(logits_from_tokens(model, tokens), model(pixel_values=pixels).logits)


def test_frozen_blocks_get_no_gradients():
    original, student = _compressed_pair(block=3)
    pool = cache_teacher(build_pool(torch.randn(4, 3, 32, 32), copies=2), original, description=None)
    first, last = 3, 4
    set_trainable_blocks(student, last, first)
    hidden = cache_prefix(pool, student, first)
    batch_loss(SuffixStudent(student, first), pool, hidden, torch.arange(8)).backward()
    layers = blocks.encoder_layers(student)
    for index, layer in enumerate(layers):
        grads = [parameter.grad for parameter in layer.parameters()]
        if first <= index <= last:
            assert all(grad is not None for grad in grads), index
        else:
            assert all(grad is None for grad in grads), index
    assert all(parameter.grad is None for parameter in student.base_model.embeddings.parameters())
    assert all(parameter.grad is None for parameter in student.classifier.parameters())


def test_warmup_schedule_and_weight_decay_groups():
    model = make_model("dinov2-cls")
    parameters = set_trainable_blocks(model, 1)
    optimizer = make_optimizer(parameters, lr=1e-3, weight_decay=1e-4)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(parameters)
    schedule = make_schedule(optimizer, warmup=10, iterations=100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == 0.0 and rates[5] == pytest.approx(5e-4) and rates[10] == pytest.approx(1e-3)
    assert rates[55] == pytest.approx(5e-4) and rates[99] < 1e-5  # cosine: half way down at the middle


def test_loss_falls_and_micro_batches_accumulate_to_the_same_step():
    original, student = _compressed_pair()
    torch.manual_seed(0)
    pool = cache_teacher(build_pool(torch.randn(8, 3, 32, 32), copies=4, seed=1), original, description=None)
    twin = copy.deepcopy(student)
    timings: list[float] = []
    losses = finetune_mimic(student, pool, None, [2], Accelerator(cpu=True), iterations=30, batch_size=8, lr=3e-3,
                            warmup=3, scope="local", timings=timings, description="test")
    assert len(losses) == len(timings) == 30
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    accumulated = finetune_mimic(twin, pool, None, [2], Accelerator(cpu=True), iterations=3, batch_size=8, lr=3e-3,
                                 warmup=3, scope="local", micro_batch_size=3, description="test")
    assert accumulated == pytest.approx(losses[:3], abs=1e-5)
