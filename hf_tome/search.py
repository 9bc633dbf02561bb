"""``hf-tome search``: per-layer prune + merge rates searched under FLOPs targets, written as a budget table.

Random search (default): draw candidates of kept counts that are non-increasing by depth, each fitted just
under one FLOPs target (the target's bucket); evaluate them in stages on growing subsets of the search images,
keeping the best fraction of every bucket after each stage; the best of each bucket is scored on held-out
validation images and becomes a table row. ``--method diffrate`` learns the rates by gradient descent instead.
Both run under Accelerate: ``accelerate launch -m hf_tome.search ...`` shards the evaluation over processes,
and plain ``hf-tome search`` runs on one CPU.

Outputs in ``--out``: ``search.json`` (candidates, stages, rows, timings) and ``search.png`` (accuracy against
GMACs, searched rows and constant-r ToMe); the model with the table in its config goes to ``--save-model``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .budget import FULL_GFLOPS_KEY, IMAGE_SIZE_KEY, budget_in_gflops
from .config import MERGE_MATCHES, ToMeConfig
from .search_space import Candidate, SearchSpace, sample_candidates


@dataclass
class SearchOptions:
    """What ``hf-tome search`` was asked to do (see ``hf-tome search --help``)."""

    model: str | None = None
    dataset: str = "fashion-mnist"
    split: str = "train"
    targets: list[float] = field(default_factory=lambda: [0.7, 0.55])
    method: str = "random"
    candidates: int = 10_000
    search_images: int = 1024
    val_images: int = 1000
    stage_images: list[int] = field(default_factory=lambda: [64, 256, 1024])
    keep: float = 0.1
    shaped: float = 0.75
    merge_matches: list[str] = field(default_factory=lambda: list(MERGE_MATCHES))
    batch_size: int = 64
    dtype: str = "auto"
    seed: int = 0
    out: Path = Path("results/search")
    save_model: Path | None = None
    in_place: bool = False
    baseline: bool = True
    diffrate_steps: int = 100
    diffrate_batch: int = 16
    diffrate_lr: float = 0.05
    flops_weight: float = 50.0
    cpu: bool = False


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

    Returns the best candidate of every bucket, its accuracy in the last stage, and a log of the stages.
    """
    survivors, stages, accuracy = list(candidates), [], []
    for number, count in enumerate(stage_images):
        start = time.perf_counter()
        last = number == len(stage_images) - 1
        scores = evaluator.evaluate([c.setting for c in survivors], count,
                                    description=f"stage {number + 1}/{len(stage_images)} ({count} images)",
                                    fidelity=not last)
        chosen: list[int] = []
        for target in sorted({c.target for c in survivors}):
            members = sorted((i for i, c in enumerate(survivors) if c.target == target),
                             key=_rank_key(scores, early=not last))
            quota = 1 if last else max(2, math.ceil(keep * len(members)))
            chosen.extend(members[:quota])
        kept = [survivors[i] for i in chosen]
        accuracy = [float(scores[i, 0] / scores[i, 2]) for i in chosen]
        stages.append({"images": int(scores[0, 2]) if len(scores) else 0, "evaluated": len(survivors),
                       "kept": len(kept), "seconds": time.perf_counter() - start,
                       "kept_accuracy": accuracy})
        if accelerator.is_main_process:
            print(f"stage {number + 1}: {len(survivors)} candidates on {stages[-1]['images']} images, kept "
                  f"{len(kept)} ({stages[-1]['seconds']:.0f} s)", file=sys.stderr)
        survivors = kept
    return survivors, accuracy, stages


def constant_r_bracket(space: SearchSpace, target_gmacs: float) -> list[int]:
    """Constant ToMe r values just above and just below ``target_gmacs`` (fewest MACs >= and most MACs <=)."""
    from .flops import encoder_report
    from .schedule import tokens_per_layer

    def gmacs(r: int) -> float:
        counts = tokens_per_layer(space.num_tokens, [r] * space.num_layers, space.shape.protected)
        return encoder_report(space.shape, counts[1:]).gmacs

    above = [r for r in range(space.num_tokens) if gmacs(r) >= target_gmacs]
    below = [r for r in range(space.num_tokens) if gmacs(r) <= target_gmacs]
    return sorted({max(above, default=0), min(below, default=max(above, default=0))})


def _load(options: SearchOptions, accelerator):
    from transformers import AutoImageProcessor

    from .bench import load_eval_dataset
    from .modeling import AutoModelForImageClassification

    if options.model is None:
        from .assets.default_model import default_model_path

        with accelerator.main_process_first():  # build the default model once, not once per process
            model_name = str(default_model_path())
    else:
        model_name = options.model
    model = AutoModelForImageClassification.from_pretrained(model_name)
    saved = ToMeConfig.from_dict(model.config.tome) if getattr(model.config, "tome", None) else ToMeConfig()
    base = saved.replace(r=0, prune_kept=None, merge_kept=None, budget=None, budget_table=None, trace_source=False)
    from .patch import apply

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
    from .accel import make_accelerator
    from .adapters.registry import find_adapter
    from .evaluation import resolve_dtype
    from .search_eval import CachedEvaluator

    started = time.perf_counter()
    accelerator = make_accelerator(cpu=options.cpu)
    model_name, model, processor, search_set, val_set, base = _load(options, accelerator)
    probe = processor(images=search_set[0]["image"].convert("RGB"), return_tensors="pt")["pixel_values"]
    image_size = tuple(int(v) for v in probe.shape[-2:])
    space = SearchSpace.for_shape(find_adapter(model).encoder_shape(model, image_size))
    full = space.full_gmacs
    targets = [budget_in_gflops(target, full) for target in options.targets]
    dtype = resolve_dtype(options.dtype, accelerator.device)
    stage_images = sorted({min(count, options.search_images) for count in options.stage_images})
    searcher = CachedEvaluator(model, search_set, processor, accelerator, dtype, options.batch_size)
    log: dict = {}
    if options.method == "random":
        candidates = sample_candidates(space, targets, options.candidates, options.seed, shaped=options.shaped,
                                       merge_matches=options.merge_matches)
        best, search_accuracy, log["stages"] = staged_random_search(searcher, candidates, stage_images, options.keep,
                                                                    accelerator)
    elif options.method == "diffrate":
        from .diffrate import diffrate_search

        best, log["diffrate"] = [], []
        for index, target in enumerate(targets):
            found, steps = diffrate_search(searcher, space, target, options.search_images, options.diffrate_steps,
                                           options.diffrate_batch, options.diffrate_lr, options.flops_weight,
                                           options.seed)
            best.append(Candidate(found.prune_kept, found.merge_kept, found.gmacs, index))
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
    chosen = [Candidate(full_kept, full_kept, full, -1), *best]
    val_scores = validator.evaluate([c.setting for c in chosen], options.val_images,
                                    "validation accuracy of the rows")
    rows = []
    for number, candidate in enumerate(chosen):
        row = {"gflops": candidate.gmacs, "fraction": candidate.gmacs / full,
               "prune_kept": list(candidate.prune_kept), "merge_kept": list(candidate.merge_kept),
               "merge_match": candidate.merge_match,
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
        from .flops import encoder_report
        from .schedule import tokens_per_layer

        for number, r in enumerate(r_values):
            counts = tokens_per_layer(space.num_tokens, [r] * space.num_layers, space.shape.protected)
            gmacs = encoder_report(space.shape, counts[1:]).gmacs
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
        _write_outputs(options, model_name, table_config, payload)
    accelerator.wait_for_everyone()
    return payload


def _write_outputs(options: SearchOptions, model_name: str, table_config: ToMeConfig, payload: dict) -> None:
    from transformers import AutoImageProcessor

    from .modeling import AutoModelForImageClassification

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    save_dir = Path(payload["saved_model"])
    # Reload instead of saving the searched model: it was cast to the search dtype, which would lose precision.
    fresh = AutoModelForImageClassification.from_pretrained(model_name, tome_config=table_config)
    fresh.save_pretrained(save_dir)
    AutoImageProcessor.from_pretrained(model_name).save_pretrained(save_dir)
    if options.in_place:
        config_path = Path(model_name) / "config.json"
        if not config_path.is_file():
            raise ValueError(f"--in-place needs a local model folder: {model_name!r} has no config.json")
        data = json.loads(config_path.read_text())
        data["tome"] = table_config.to_dict()
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        payload["updated_in_place"] = str(config_path)
    (out / "search.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plot_search(payload, out / "search.png")
    print(format_rows(payload))
    print(f"search: {payload['search_seconds']:.0f} s searching, {payload['total_seconds']:.0f} s in all; wrote "
          f"{out / 'search.json'}, {out / 'search.png'} and the model with its budget table in {save_dir}")


def format_rows(payload: dict) -> str:
    """Markdown table of the budget table and the ToMe baseline."""
    lines = ["| setting | GMACs | fraction | val. accuracy | merge match | tokens leaving each layer |",
             "|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        name = "full" if row["fraction"] >= 0.999 else f"searched @{row.get('target')}"
        lines.append(f"| {name} | {row['gflops']:.3f} | {row['fraction']:.3f} | {100 * row['accuracy']:.2f}% | "
                     f"{row.get('merge_match', 'class_attention')} | {row['merge_kept']} |")
    for row in payload["tome_baseline"]:
        lines.append(f"| ToMe r={row['r']} | {row['gflops']:.3f} | {row['fraction']:.3f} | "
                     f"{100 * row['accuracy']:.2f}% | bipartite | |")
    return "\n".join(lines)


def plot_search(payload: dict, path: Path) -> None:
    """Accuracy against GMACs: the searched rows against constant-r ToMe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    rows = payload["rows"]
    axis.plot([r["gflops"] for r in rows], [100 * r["accuracy"] for r in rows], "o-",
              label=f"prune + merge, {payload['method']} search")
    if payload["tome_baseline"]:
        tome = sorted(payload["tome_baseline"], key=lambda r: r["gflops"])
        axis.plot([r["gflops"] for r in tome], [100 * r["accuracy"] for r in tome], "s--", label="ToMe, constant r")
        for row in tome:
            axis.annotate(f"r={row['r']}", (row["gflops"], 100 * row["accuracy"]), textcoords="offset points",
                          xytext=(4, -10), fontsize=8)
    axis.set_xlabel("GMACs per image")
    axis.set_ylabel("validation accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(f"{Path(payload['model']).name}: budget table", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hf-tome search`` (shared with ``python -m hf_tome.search``)."""
    defaults = SearchOptions()
    parser.add_argument("--model", default=None, help="local folder or Hub id of an image classifier (default: the "
                        "embedded DINOv2-S Fashion-MNIST model)")
    parser.add_argument("--dataset", default=defaults.dataset, help="'fashion-mnist', a Dataset.save_to_disk folder "
                        "or a Hub dataset id, with 'image' and 'label' columns")
    parser.add_argument("--split", default=defaults.split, help="labelled split, cut into search and validation "
                        "images (default: train)")
    parser.add_argument("--targets", type=float, nargs="+", default=defaults.targets,
                        help="FLOPs targets: fractions (<= 1) of the full model's MACs or GFLOPs (> 1)")
    parser.add_argument("--method", choices=["random", "diffrate"], default=defaults.method)
    parser.add_argument("--candidates", type=int, default=defaults.candidates, help="random candidates in all")
    parser.add_argument("--search-images", type=int, default=defaults.search_images)
    parser.add_argument("--val-images", type=int, default=defaults.val_images)
    parser.add_argument("--stage-images", type=int, nargs="+", default=defaults.stage_images,
                        help="images per evaluation stage (growing); the last stage picks each bucket's best")
    parser.add_argument("--keep", type=float, default=defaults.keep, help="fraction of each bucket kept per stage")
    parser.add_argument("--shaped", type=float, default=defaults.shaped, help="fraction of the random candidates "
                        "drawn with ToMe-like shapes and small prune shares (the rest: any non-increasing profile)")
    parser.add_argument("--merge-matches", nargs="+", choices=list(MERGE_MATCHES), default=defaults.merge_matches,
                        help="merge rules the random candidates take in turn: class_attention (merge the tokens "
                        "ranked below merge_kept into their most similar kept token) and/or bipartite (ToMe's "
                        "matching on the survivors of pruning); each row stores the rule it won with. Random "
                        "search only: --method diffrate relaxes the class-attention rule")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=defaults.out, help="folder for search.json and search.png")
    parser.add_argument("--save-model", type=Path, default=None, help="where to save the model with its budget "
                        "table (default: <out>/model)")
    parser.add_argument("--in-place", action="store_true", help="also write the table into --model's config.json")
    parser.add_argument("--no-baseline", action="store_true", help="skip constant-r ToMe on the validation images")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is available")
    parser.add_argument("--diffrate-steps", type=int, default=defaults.diffrate_steps)
    parser.add_argument("--diffrate-batch", type=int, default=defaults.diffrate_batch)
    parser.add_argument("--diffrate-lr", type=float, default=defaults.diffrate_lr)
    parser.add_argument("--flops-weight", type=float, default=defaults.flops_weight,
                        help="lambda of the FLOPs penalty of the differentiable search")


def options_from_args(args: argparse.Namespace) -> SearchOptions:
    """``SearchOptions`` from parsed ``add_search_arguments`` arguments."""
    values = vars(args).copy()
    values["baseline"] = not values.pop("no_baseline")
    return SearchOptions(**{key: values[key] for key in SearchOptions.__dataclass_fields__ if key in values})


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_tome.search`` / ``accelerate launch -m hf_tome.search``."""
    parser = argparse.ArgumentParser(prog="hf_tome.search", description=__doc__.split("\n")[0])
    add_search_arguments(parser)
    run_search(options_from_args(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
