"""``hf-tome compress``: few-shot DC-ViT block compression of a ViT, DeiT or Dinov2 model to a MACs target.

Steps (``../shared/spec/methods.md`` section 3): plan the blocks for the target (:mod:`hf_tome.dcvit.block_budget`),
generate a synthetic metric set from noise (:mod:`hf_tome.dcvit.metric_set`), trial every block but the first and last,
compress the best ones one at a time with feature-mimicking fine-tuning on the unlabeled images
(:mod:`hf_tome.dcvit.trial`, :mod:`hf_tome.dcvit.mimic`), and save a model that
``hf_tome.AutoModel*.from_pretrained`` loads,
with a model card. ``--method drop`` removes whole blocks instead (the baseline), with the same trial and
fine-tuning. Runs under Accelerate: ``accelerate launch -m hf_tome.dcvit.compress ...`` for several devices or mixed
precision; ``--resume`` continues from the state saved after each compressed block.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from hf_tome.core.cli_help import DefaultsHelpFormatter
from hf_tome.dcvit.block_budget import block_costs, plan_blocks
from hf_tome.dcvit.blocks import CONFIG_KEY, compress_layer, encoder_layers, record_compression, split_units
from hf_tome.dcvit.metric_set import generate_metric_set
from hf_tome.dcvit.mimic import Checkpoint, feature_mse, finetune_mimic
from hf_tome.dcvit.options import CompressOptions, add_compress_arguments
from hf_tome.dcvit.pool import AugmentedPool, build_pool, cache_teacher
from hf_tome.dcvit.recipe import StepCosts, TrainingPlan, epochs_to_iterations, fit_to_budget, warmup_iterations
from hf_tome.dcvit.stages import has_head
from hf_tome.dcvit.trial import (
    STATE_MODEL,
    TRIAL_REFIT_IMAGES,
    CompressionState,
    activation_importance,
    divergence_scorer,
    final_finetune,
    per_block_iterations,
    progressive_compress,
    trial_blocks,
)
from hf_tome.evaluation.accel import make_accelerator
from hf_tome.integration.flops import compute_report


def load_unlabeled_pixels(options: CompressOptions, image_processor) -> tuple[torch.Tensor, str]:
    """``options.num_images`` preprocessed images of the data source, and a description of where they came from.

    ``data``: ``fashion-mnist``, a folder of image files, a ``Dataset.save_to_disk`` folder or a Hub dataset id.
    Labels, if any, are ignored.
    """
    from hf_tome.evaluation.classification import pixel_batches
    from hf_tome.evaluation.datasets import load_eval_dataset

    dataset = load_eval_dataset(options.data, options.split, None, columns=(options.image_column,))
    if not 1 <= options.num_images <= len(dataset):
        raise ValueError(f"num_images={options.num_images} is invalid: expected 1..{len(dataset)} (the rows of "
                         f"{options.data!r})")
    rows = dataset.shuffle(seed=options.seed).select(range(options.num_images))
    batches = pixel_batches(rows, image_processor, 64, options.image_column, label_column=None)
    return torch.cat([pixels for pixels, _ in batches]), f"{options.data}, split {options.split!r}, seed {options.seed}"


def _load_model(name: str) -> nn.Module:
    import transformers

    from hf_tome.integration.loading import _load

    config = transformers.AutoConfig.from_pretrained(name)
    classifier = any(arch.endswith("ForImageClassification") for arch in (config.architectures or []))
    auto = transformers.AutoModelForImageClassification if classifier else transformers.AutoModel
    return _load(auto, name, config=config).eval()


def _metric_scorer(options: CompressOptions, original: nn.Module, pixels: torch.Tensor, teacher: torch.Tensor,
                   accelerator: Accelerator, state_dir: Path):
    """KL on a synthetic metric set for classifiers; feature MSE on the unlabeled images for bare backbones."""
    num_labels = getattr(getattr(original, "classifier", None), "out_features", None)
    if num_labels is None:
        return lambda student: feature_mse(student, pixels, teacher, accelerator=accelerator), None
    path = state_dir / "metric_set.pt"
    if path.exists():
        metric = torch.load(path)
    else:
        original.requires_grad_(False)

        def logits_fn(images: torch.Tensor) -> torch.Tensor:
            with accelerator.autocast():
                return original(pixel_values=images).logits

        generated = generate_metric_set(logits_fn, options.metric_images, num_labels, tuple(pixels.shape[1:]),
                                        steps=options.metric_steps, seed=options.seed, device=accelerator.device,
                                        progress=accelerator.is_local_main_process)
        metric = {"pixel_values": generated.pixel_values.cpu(), "labels": generated.labels.cpu(),
                  "losses": generated.losses}
        if accelerator.is_main_process:
            state_dir.mkdir(parents=True, exist_ok=True)
            torch.save(metric, path)
    return divergence_scorer(original, metric["pixel_values"], accelerator), metric["losses"]


def _measure(options: CompressOptions, original: nn.Module, compressed: nn.Module, image_processor) -> dict:
    from hf_tome.evaluation.classification import evaluate_classifier
    from hf_tome.evaluation.datasets import load_eval_dataset

    dataset = load_eval_dataset(options.eval_dataset, options.eval_split, options.eval_limit)
    results = {name: evaluate_classifier(model, dataset, image_processor, batch_size=32, description=name)
               for name, model in (("original", original), ("compressed", compressed))}
    return {"accuracy": results["compressed"].accuracy, "original_accuracy": results["original"].accuracy,
            "images_per_s": results["compressed"].images_per_s,
            "original_images_per_s": results["original"].images_per_s, "eval_dataset": options.eval_dataset,
            "eval_images": len(dataset), "speed_setup": "float32 forward passes, batch 32, on the evaluation machine"}


def training_plan(options: CompressOptions, num_blocks: int, num_candidates: int) -> TrainingPlan:
    """The iterations of every phase from the options (the deprecated ``*_epochs`` aliases win when given)."""
    def iterations(value: int, epochs: float | None) -> int:
        return value if epochs is None else (0 if epochs <= 0 else
                                             epochs_to_iterations(epochs, options.num_images, options.batch_size))

    return TrainingPlan(per_block=iterations(options.iterations_per_block, options.epochs_per_block),
                        final=iterations(options.final_iterations, options.final_epochs),
                        trial=iterations(options.trial_iterations, options.trial_epochs), num_blocks=num_blocks,
                        num_candidates=num_candidates)


def measure_costs(original: nn.Module, pool: AugmentedPool, kept_units: int, accelerator: Accelerator,
                  options: CompressOptions, pool_seconds: float, plan: TrainingPlan, steps: int = 3) -> StepCosts:
    """Time ``steps`` fine-tuning steps (after one untimed) on a copy of ``original`` with its middle block
    compressed, for the training and the trial scope, and estimate the work that does not scale with the
    iterations from ``pool_seconds`` (the teacher's pass over the pool)."""
    middle = len(encoder_layers(original)) // 2

    def step_seconds(scope: str) -> float:
        probe = copy.deepcopy(original)
        compress_layer(encoder_layers(probe)[middle], kept_units)
        timings: list[float] = []
        finetune_mimic(probe, pool, None, [middle], accelerator, iterations=steps + 1, batch_size=options.batch_size,
                       lr=0.0, scope=scope, micro_batch_size=options.micro_batch_size,
                       logits_weight=options.logits_weight, cache_dtype=_cache_dtype(options),
                       timings=timings, description="measuring a step")
        return sorted(timings[1:])[len(timings[1:]) // 2]

    step = step_seconds(options.train_scope)
    trial = step if options.trial_scope == options.train_scope else step_seconds(options.trial_scope)
    per_cache = {"prefix": 0.05, "local": 0.5}  # share of a teacher pass a frozen-prefix cache costs, roughly
    caches = (per_cache[options.train_scope] * (plan.num_blocks + (plan.final > 0))
              + per_cache[options.trial_scope] * plan.num_candidates * (plan.trial > 0))  # no steps: no cache
    # Feature MSE before and after every block on the images; a trial scores a classifier on the metric set
    # (the images themselves for a bare backbone).
    scored = options.metric_images if has_head(original) else len(pool.pixels)
    evaluations = (2 * plan.num_blocks * len(pool.pixels) + plan.num_candidates * scored) / len(pool)
    # A least-squares refit runs the student and the original up to the block: about one pass over its images.
    refits = 0.0 if options.init != "least-squares" or options.method == "drop" else (
        plan.num_blocks * len(pool.pixels) + plan.num_candidates * min(TRIAL_REFIT_IMAGES, len(pool.pixels))
    ) / len(pool)
    return StepCosts(step=step, trial_step=trial, fixed=pool_seconds * (caches + evaluations + refits))


def _cache_dtype(options: CompressOptions) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[options.cache_dtype]


def _finetune_settings(options: CompressOptions, iterations: int, scope: str) -> dict:
    return {"iterations": iterations, "scope": scope, "weight_decay": options.weight_decay,
            "warmup": warmup_iterations(iterations, options.num_images, options.batch_size,
                                        options.warmup_iterations),
            "micro_batch_size": options.micro_batch_size, "logits_weight": options.logits_weight,
            "cache_dtype": _cache_dtype(options), "seed": options.seed}


def _checkpoint_settings(state: CompressionState, on_checkpoint: Checkpoint | None,
                         final_checkpoints: int) -> tuple[dict, dict]:
    """``finetune_mimic`` arguments that call ``on_checkpoint`` with the iterations so far: at the end of every
    per-block phase, and at ``final_checkpoints`` steps of the final phase (nothing when ``on_checkpoint`` is None).

    The phase in progress is not in ``state.losses`` yet, so the steps before it are those of the finished
    per-block phases."""
    if on_checkpoint is None:
        return {}, {}

    def at_step(step: int, student: nn.Module) -> None:
        on_checkpoint(per_block_iterations(state.losses) + step, student)

    return ({"on_checkpoint": at_step, "checkpoints": 1},
            {"on_checkpoint": at_step, "checkpoints": final_checkpoints})


def run_compress(options: CompressOptions, clock: Callable[[], float] = time.perf_counter, *,
                 on_checkpoint: Checkpoint | None = None, final_checkpoints: int = 4) -> dict:
    """Run the whole compression; returns the summary also written to ``options.out/compress.json``.

    ``clock`` (seconds) times the run and the ``--budget-minutes`` measurement.

    ``on_checkpoint(iterations, student)``, when given, sees the student during its fine-tuning: at the end of
    every per-block phase and at ``final_checkpoints`` evenly spaced steps of the final phase (the last at its
    end), with ``iterations`` the fine-tuning steps so far (per-block phases, resumed ones included, plus the final
    phase's). It runs on the main process with the student in eval mode and must not change it (see
    :func:`~hf_tome.dcvit.mimic.finetune_mimic`); e.g. a benchmark's accuracy-against-iterations curve. Block
    trials are not seen. Its time counts in the summary's ``seconds`` but not in ``--budget-minutes``' plan. An
    argument, not an option: nothing of it is saved in ``compress.json`` or the model's config."""
    from transformers import AutoImageProcessor

    accelerator = make_accelerator(**({"mixed_precision": options.mixed_precision} if options.mixed_precision else {}))
    started = clock()
    torch.manual_seed(options.seed)
    if options.model is None:
        from hf_tome.evaluation.assets.default_model import default_model_path

        with accelerator.main_process_first():
            model_name = str(default_model_path())
    else:
        model_name = options.model
    original = _load_model(model_name).to(accelerator.device)
    encoder_layers(original)  # refuses unsupported families before any work
    image_processor = AutoImageProcessor.from_pretrained(model_name)
    pixels, samples_source = load_unlabeled_pixels(options, image_processor)
    image_size = tuple(pixels.shape[-2:])  # MACs at the size the image processor produces, not the config's
    costs = block_costs(original, image_size)
    plan = plan_blocks(costs, options.target, options.method)
    state_dir = options.out / "state"
    pool = build_pool(pixels, options.pool_copies, options.augment, options.seed,
                      getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None))
    pool_started = clock()
    cache_teacher(pool, original, accelerator, logits=options.logits_weight > 0, dtype=_cache_dtype(options),
                  description="teacher outputs" if accelerator.is_local_main_process else None)
    pool_seconds = clock() - pool_started
    teacher = pool.plain_teacher_tokens()
    importance = (activation_importance(original, pixels[:64].to(accelerator.device))
                  if options.importance == "activation" else None)
    candidates = list(range(1, costs.num_layers - 1))
    per_block = plan.kept_units // plan.num_blocks
    training = training_plan(options, plan.num_blocks, len(candidates))
    if options.budget_minutes is not None:
        step_costs = measure_costs(original, pool, per_block, accelerator, options, pool_seconds, training)
        training = fit_to_budget(training, step_costs, options.budget_minutes * 60 - (clock() - started))
        if accelerator.is_local_main_process:
            print(f"budget {options.budget_minutes:g} min: {step_costs.step:.3f} s per step, "
                  f"{step_costs.trial_step:.3f} s per trial step, {step_costs.fixed / 60:.1f} min of fixed work")
    if accelerator.is_local_main_process:
        print(f"{training.describe()}; pool of {len(pool)} entries ({options.pool_copies} copies, {options.augment}), "
              f"batch {options.batch_size}, teacher pass {pool_seconds:.1f} s")
    state = CompressionState.load(state_dir) if options.resume else None
    metric_losses = None
    if state is None:
        state = CompressionState(method=options.method, target=options.target)
        score, metric_losses = _metric_scorer(options, original, pixels, teacher, accelerator, state_dir)
        scores = trial_blocks(original, candidates, per_block, pool, None, accelerator, score, importance,
                              batch_size=options.batch_size, lr=options.lr, init=options.init,
                              **_finetune_settings(options, training.trial, options.trial_scope))
        state.trial_scores = {str(block): value for block, value in scores.items()}
        state.order = sorted(scores, key=scores.get)[: plan.num_blocks]
        state.widths = {str(b): units for b, units in split_units(plan.kept_units, sorted(state.order)).items()}
        if accelerator.is_main_process:
            state.save(state_dir)
    student = _load_model(str(state_dir / STATE_MODEL)) if state.done else copy.deepcopy(original)
    block_hook, final_hook = _checkpoint_settings(state, on_checkpoint, final_checkpoints)
    student = progressive_compress(student.to(accelerator.device), state, pool, None, accelerator, state_dir,
                                   importance, batch_size=options.batch_size, lr=options.lr, original=original,
                                   init=options.init, **block_hook,
                                   **_finetune_settings(options, training.per_block, options.train_scope))
    student = final_finetune(student, state, pool, None, accelerator, state_dir, batch_size=options.batch_size,
                             lr=options.lr, **final_hook,
                             **_finetune_settings(options, training.final, options.train_scope))
    report = compute_report(student, image_size)
    full_gmacs = costs.full_macs / 1e9
    details = {"method": options.method, "init": options.init, "target": options.target, "base_model": model_name,
               "num_samples": len(pixels), "samples_source": samples_source, "gmacs": report.gmacs,
               "full_gmacs": full_gmacs, "image_size": list(image_size), "trial_scores": state.trial_scores}
    if options.eval_dataset:
        details["measured"] = _measure(options, original, student, image_processor)
    record_compression(student, **details)
    summary = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
               "block_compression": getattr(student.config, CONFIG_KEY), "planned_gmacs": plan.planned_macs / 1e9,
               "target_gmacs": plan.target_macs / 1e9, "feature_mse": state.feature_mse, "refit": state.refit,
               "losses": state.losses,
               "metric_set_losses": metric_losses, "training_plan": asdict(training),
               "seconds": clock() - started}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from hf_tome.dcvit.model_card import push_compressed_to_hub, save_with_card

        model_dir = save_with_card(student, options.out / "model")
        image_processor.save_pretrained(model_dir)
        (options.out / "compress.json").write_text(json.dumps(summary, indent=1))
        if options.push_to_hub:
            push_compressed_to_hub(student, options.push_to_hub,
                                   extra_files={"preprocessor_config.json": model_dir / "preprocessor_config.json"})
        print(f"compressed {model_name} to {report.gmacs:.3f} GMACs ({report.gmacs / full_gmacs:.1%}); "
              f"blocks {sorted(state.order)}, widths {state.widths}; saved to {model_dir}")
    return summary


def options_from_args(args: argparse.Namespace) -> CompressOptions:
    """``CompressOptions`` from parsed ``add_compress_arguments`` arguments."""
    values = vars(args)
    return CompressOptions(**{key: values[key] for key in CompressOptions.__dataclass_fields__ if key in values})


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_tome.dcvit.compress`` / ``accelerate launch -m hf_tome.dcvit.compress``."""
    parser = argparse.ArgumentParser(prog="hf_tome.dcvit.compress", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    add_compress_arguments(parser)
    run_compress(options_from_args(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
