"""``hf-tome search``: per-layer prune + merge rates searched under FLOPs targets, written as a budget table.

Random search (default): draw candidates of kept counts that are non-increasing by depth, each fitted just
under one FLOPs target (the target's bucket), block 0 included unless ``--protect-block-0``; evaluate them in
stages on growing subsets of the search images, keeping the best fraction of every bucket after each stage
(successive halving by default: ``--eta`` times more images and 1/eta of the candidates per stage; ``--strategy
staged`` is the earlier 10,000-candidate search). ToMe's own schedules at each target (``--tome-seeds``) join
the last stage, so every row is at least as good as the best of them on the search images. The best of each
bucket is scored on held-out validation images and becomes a table row. ``--method diffrate`` learns the rates
by gradient descent instead.
Both run under Accelerate: ``accelerate launch -m hf_tome.budgets.search ...`` shards the evaluation over processes,
and plain ``hf-tome search`` runs on one CPU.

Outputs in ``--out``: ``search.json`` (candidates, stages, rows, timings) and ``search.png`` (accuracy against
GMACs, searched rows and constant-r ToMe); the model with the table in its config goes to ``--save-model``.
This module runs the search; :mod:`hf_tome.budgets.search_estimate` says beforehand how long it will take and
:mod:`hf_tome.budgets.search_outputs` writes what it found.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from hf_tome.budgets.options import SearchOptions, add_search_arguments, resolve_schedule
from hf_tome.budgets.search_estimate import measure_search_estimate, stage_quota
from hf_tome.budgets.search_outputs import write_outputs
from hf_tome.budgets.search_space import Candidate, SearchSpace, sample_candidates
from hf_tome.config import ToMeConfig
from hf_tome.core.cli_help import DefaultsHelpFormatter
from hf_tome.core.macs import nearest_r
from hf_tome.integration.budget_table import FULL_GFLOPS_KEY, IMAGE_SIZE_KEY, budget_in_gflops


def _rank_key(scores: torch.Tensor, early: bool):
    """Sort key. Early stages: lower KL divergence from the uncompressed model (on a few images far less noisy
    than accuracy). The last stage, which picks the row: higher accuracy, ties broken by the loss."""
    if early:
        return lambda item: float(scores[item, 3])
    return lambda item: (-float(scores[item, 0]), float(scores[item, 1]))


def staged_random_search(evaluator, candidates: list[Candidate], stage_images: list[int], keep: float,
                         accelerator) -> tuple[list[Candidate], list[float], list[dict]]:
    """Evaluate on growing subsets, keeping the ``keep`` fraction of every bucket closest to the uncompressed
    model's predictions, then the most accurate candidate of every bucket on the last subset.

    ToMe seeds (``Candidate.is_tome_seed``) skip the earlier stages and join the last one, so each bucket's winner
    is ranked against them on the same images: it is at least as accurate as the best of them there (ties: loss).
    Returns the best candidate of every bucket, its accuracy in the last stage, and a log of the stages.
    """
    survivors = [c for c in candidates if not c.is_tome_seed]
    seeds = [c for c in candidates if c.is_tome_seed]
    stages, accuracy = [], []
    for number, count in enumerate(stage_images):
        start = time.perf_counter()
        last = number == len(stage_images) - 1
        if last:
            survivors = survivors + seeds
        scores = evaluator.evaluate([c.setting for c in survivors], count,
                                    description=f"stage {number + 1}/{len(stage_images)} ({count} images)",
                                    fidelity=not last)
        chosen: list[int] = []
        for target in sorted({c.target for c in survivors}):
            members = sorted((i for i, c in enumerate(survivors) if c.target == target),
                             key=_rank_key(scores, early=not last))
            chosen.extend(members[: stage_quota(len(members), keep, last)])
        kept = [survivors[i] for i in chosen]
        accuracy = [float(scores[i, 0] / scores[i, 2]) for i in chosen]
        stages.append({"images": int(scores[0, 2]) if len(scores) else 0, "evaluated": len(survivors),
                       "kept": len(kept), "seconds": time.perf_counter() - start,
                       "kept_accuracy": accuracy, "kept_origin": [c.origin for c in kept]})
        if last:
            stages[-1]["finalists"] = [
                {"target": c.target, "origin": c.origin, "merge_match": c.merge_match, "gmacs": c.gmacs,
                 "accuracy": float(scores[i, 0] / scores[i, 2]), "nll": float(scores[i, 1] / scores[i, 2])}
                for i, c in enumerate(survivors)]
        if accelerator.is_main_process:
            print(f"stage {number + 1}: {len(survivors)} candidates on {stages[-1]['images']} images, kept "
                  f"{len(kept)} ({stages[-1]['seconds']:.0f} s)", file=sys.stderr)
        survivors = kept
    return survivors, accuracy, stages


def constant_r_gmacs(space: SearchSpace, r: int) -> float:
    """GMACs per image of constant-r ToMe (``r`` merged in every layer, block 0 included) in ``space``."""
    return replace(space, protect_block_0=False).tome_gmacs(r)


def constant_r_bracket(space: SearchSpace, target_gmacs: float) -> list[int]:
    """Constant ToMe r values just above and just below ``target_gmacs`` (fewest MACs >= and most MACs <=)."""
    gmacs = partial(constant_r_gmacs, space)
    above = nearest_r(gmacs, target_gmacs, space.num_tokens - 1, side="at_least") or 0
    below = nearest_r(gmacs, target_gmacs, space.num_tokens - 1, side="at_most")
    return sorted({above, above if below is None else below})


def _load(options: SearchOptions, accelerator):
    from transformers import AutoImageProcessor

    from hf_tome.evaluation.datasets import load_eval_dataset
    from hf_tome.integration.loading import AutoModelForImageClassification

    if options.model is None:
        from hf_tome.evaluation.assets.default_model import default_model_path

        with accelerator.main_process_first():  # build the default model once, not once per process
            model_name = str(default_model_path())
    else:
        model_name = options.model
    model = AutoModelForImageClassification.from_pretrained(model_name)
    saved = ToMeConfig.from_dict(model.config.tome) if getattr(model.config, "tome", None) else ToMeConfig()
    # The candidates are scored, and the table saved, with the requested merge rule, mode and pruning layers (else
    # the saved ones).
    base = saved.replace(r=0, prune_kept=None, merge_kept=None, budget=None, budget_table=None, trace_source=False,
                         **saved.merging(merge_rule=options.merge_rule, merge_mode=options.merge_mode,
                                         prune_matched_layers=options.prune_matched_layers))
    from hf_tome.integration.patch import apply

    apply(model, base)
    processor = AutoImageProcessor.from_pretrained(model_name)
    dataset = load_eval_dataset(options.dataset, options.split, None).shuffle(seed=options.seed)
    needed = options.search_images + options.val_images
    if len(dataset) < needed:
        raise ValueError(f"split {options.split!r} of {options.dataset!r} has {len(dataset)} rows: expected at least "
                         f"search_images + val_images = {needed}")
    search_set = dataset.select(range(options.search_images))
    val_set = dataset.select(range(options.search_images, needed))
    return model_name, model, processor, search_set, val_set, base


def run_search(options: SearchOptions) -> dict:
    """Run the search end to end; returns the JSON payload (also written to ``options.out/search.json``)."""
    from hf_tome.budgets.search_eval import CachedEvaluator
    from hf_tome.evaluation.accel import make_accelerator
    from hf_tome.evaluation.classification import resolve_dtype
    from hf_tome.integration.registry import find_adapter

    started = time.perf_counter()
    if options.keep_freed_memory:  # this process runs forwards only: their activations stop page-faulting
        from hf_tome.core.allocator import keep_freed_memory

        keep_freed_memory()
    accelerator = make_accelerator(cpu=options.cpu)
    model_name, model, processor, search_set, val_set, base = _load(options, accelerator)
    probe = processor(images=search_set[0]["image"].convert("RGB"), return_tensors="pt")["pixel_values"]
    image_size = tuple(int(v) for v in probe.shape[-2:])
    space = SearchSpace.for_shape(find_adapter(model).encoder_shape(model, image_size))
    full = space.full_gmacs
    targets = [budget_in_gflops(target, full) for target in options.targets]
    dtype = resolve_dtype(options.dtype, accelerator.device)
    stage_images, keep, count = resolve_schedule(options, len(targets))
    searcher = CachedEvaluator(model, search_set, processor, accelerator, dtype, options.batch_size)
    log: dict = {}
    if options.method == "random":
        space = SearchSpace.for_shape(space.shape, protect_block_0=options.protect_block_0)
        candidates = sample_candidates(space, targets, count, options.seed, shaped=options.shaped,
                                       merge_matches=options.merge_matches, tome_inflects=options.tome_seeds,
                                       tome_decays=options.tome_decays, tome_first_steps=options.tome_first_steps or ())
        estimate = measure_search_estimate(searcher, candidates, stage_images, keep)
        log["schedule"] = {"strategy": options.strategy, "stage_images": stage_images, "keep": keep,
                           "candidates": count, "tome_seeds": [c.origin for c in candidates if c.is_tome_seed],
                           "protect_block_0": options.protect_block_0}
        log["estimate"] = {"seconds": estimate.seconds, "passes": estimate.passes,
                           "seconds_per_image": estimate.seconds_per_image}
        if accelerator.is_main_process:
            print(estimate.message(accelerator.device.type, accelerator.num_processes), file=sys.stderr)
        best, search_accuracy, log["stages"] = staged_random_search(searcher, candidates, stage_images, keep,
                                                                    accelerator)
    elif options.method == "diffrate":
        from hf_tome.budgets.diffrate import diffrate_search

        best, log["diffrate"] = [], []
        for index, target in enumerate(targets):
            found, steps = diffrate_search(searcher, space, target, options.search_images, options.diffrate_steps,
                                           options.diffrate_batch, options.diffrate_lr, options.flops_weight,
                                           options.seed)
            best.append(Candidate(found.prune_kept, found.merge_kept, found.gmacs, index, origin="diffrate"))
            log["diffrate"].append(steps)
        scores = searcher.evaluate([c.setting for c in best], options.search_images,
                                   "search accuracy of the learned rows")
        search_accuracy = (scores[:, 0] / scores[:, 2]).tolist()
    else:
        raise ValueError(f"method={options.method!r} is invalid: expected 'random' or 'diffrate'")
    search_seconds = time.perf_counter() - started
    del searcher
    validator = CachedEvaluator(model, val_set, processor, accelerator, dtype, options.batch_size,
                                keep_pixels=options.baseline)
    full_kept = (space.num_tokens,) * space.num_layers
    chosen = [Candidate(full_kept, full_kept, full, -1, origin="full"), *best]
    val_scores = validator.evaluate([c.setting for c in chosen], options.val_images,
                                    "validation accuracy of the rows")
    rows = []
    for number, candidate in enumerate(chosen):
        row = {"gflops": candidate.gmacs, "fraction": candidate.gmacs / full,
               "prune_kept": list(candidate.prune_kept), "merge_kept": list(candidate.merge_kept),
               "merge_match": candidate.merge_match, "origin": candidate.origin,
               "accuracy": float(val_scores[number, 0] / val_scores[number, 2])}
        if number > 0:
            row["target"] = options.targets[candidate.target]
            row["search_accuracy"] = search_accuracy[number - 1]
        rows.append(row)
    rows.sort(key=lambda row: row["gflops"])
    baseline = []
    if options.baseline:
        r_values = sorted({r for target in targets for r in constant_r_bracket(space, target)})
        scores = validator.evaluate_merging(r_values, options.val_images)
        for number, r in enumerate(r_values):
            gmacs = constant_r_gmacs(space, r)
            baseline.append({"r": r, "gflops": gmacs, "fraction": gmacs / full,
                             "accuracy": float(scores[number, 0] / scores[number, 2])})
    table_config = base.replace(budget_table=rows, extra={**base.extra, FULL_GFLOPS_KEY: full,
                                                          IMAGE_SIZE_KEY: list(image_size)})
    payload = {"model": model_name, "dataset": options.dataset, "split": options.split, "method": options.method,
               "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
               "image_size": list(image_size), "full_gflops": full, "targets_gflops": targets,
               "dtype": str(dtype), "processes": accelerator.num_processes, "search_seconds": search_seconds,
               "total_seconds": time.perf_counter() - started, "rows": rows, "tome_baseline": baseline, "log": log}
    payload["saved_model"] = str(Path(options.save_model) if options.save_model else Path(options.out) / "model")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_outputs(options, model_name, table_config, payload)
    accelerator.wait_for_everyone()
    return payload


def options_from_args(args: argparse.Namespace) -> SearchOptions:
    """``SearchOptions`` from parsed ``add_search_arguments`` arguments."""
    values = vars(args).copy()
    values["baseline"] = not values.pop("no_baseline")
    return SearchOptions(**{key: values[key] for key in SearchOptions.__dataclass_fields__ if key in values})


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_tome.budgets.search`` / ``accelerate launch -m hf_tome.budgets.search``."""
    parser = argparse.ArgumentParser(prog="hf_tome.budgets.search", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    add_search_arguments(parser)
    run_search(options_from_args(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
