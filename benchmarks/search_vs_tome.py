"""Searched prune + merge rates against constant-r ToMe at the same MACs, on the embedded DINOv2-S model.

1. ``hf-tome search`` (random search, successive halving by default, block 0 compressed too, ToMe's own
   schedules seeded into the last stage) on the Fashion-MNIST *train* split, cut into search and validation
   images, for FLOPs targets at the MACs of ToMe r=12 and r=18 (70.1% and 55.9% of the full model's MACs at
   224 px; skipped with ``--model`` pointing at a folder that already has a budget table).
2. On held-out Fashion-MNIST *test* images (all 10,000 by default), every setting runs end to end from the
   pixels: the full model, each searched row, and for each row the constant ToMe r with the fewest MACs that are
   still >= the row's (so ToMe never gets less compute), the same r with the searched rows' merging, and
   constant-r ToMe at the ``--tome-curve`` r (6, 9, 15, 21 by default) for the plot's curve.

Prints a markdown table, the paired differences and the search time, and writes ``search_vs_tome.json`` into
``--out`` (default ``benchmarks/results``) and a plot of accuracy against GMACs to ``--plot`` (default
``benchmarks/plots/search_vs_tome.png``). The searched rows merge with ATC's agglomerative clustering and
ToFu's norm-preserving MLERP by default (``--merge-rule bipartite --merge-mode mean`` is ToMe's merging);
constant-r ToMe runs both as published (bipartite, mean) and with the searched rows' merging.

    python benchmarks/search_vs_tome.py --threads 2            # the full run: ~20 min search + ~65 min of tests
    python benchmarks/search_vs_tome.py --quick --threads 2    # smoke run: a few images, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import torch

from hf_tome.config import MERGE_MODES, MERGE_OPTION_DEFAULTS, MERGE_RULES

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"search_images": 32, "val_images": 16, "test_images": 64, "min_images": 8, "eta": 2.0, "finalists": 1,
         "batch_size": 16}
"""What ``--quick`` sets (unless given explicitly): a smoke run of every step on a few images."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a folder with a budget table (skips the search)")
    parser.add_argument("--search-model", default=None, help="the model to search (default: the embedded DINOv2-S; "
                        "its head must have Fashion-MNIST's 10 classes)")
    parser.add_argument("--targets", type=float, nargs="+", default=None,
                        help="FLOPs targets (fractions or GFLOPs) instead of --targets-at-tome-r")
    parser.add_argument("--method", default="random", choices=["random", "diffrate"])
    parser.add_argument("--strategy", default="halving", choices=["halving", "staged"],
                        help="see hf-tome search --help; staged with --candidates 1500 --stage-images 16 96 1024 "
                        "--protect-block-0 --tome-seeds is the README's earlier run")
    parser.add_argument("--candidates", type=int, default=None, help="default: the strategy's")
    parser.add_argument("--search-images", type=int, default=None, help="default 1024")
    parser.add_argument("--val-images", type=int, default=None, help="default 256")
    parser.add_argument("--stage-images", type=int, nargs="+", default=None, help="default: the strategy's")
    parser.add_argument("--keep", type=float, default=None, help="default: the strategy's")
    parser.add_argument("--eta", type=float, default=None, help="successive halving factor (default 3)")
    parser.add_argument("--min-images", type=int, default=None, help="images of the first halving stage (default 12)")
    parser.add_argument("--finalists", type=int, default=None, help="random candidates per target in the last "
                        "stage (default 2)")
    parser.add_argument("--protect-block-0", action="store_true", help="never compress block 0 (the old rule)")
    parser.add_argument("--tome-seeds", type=float, nargs="*", default=[0.0, -0.5, 0.5], metavar="INFLECT",
                        help="ToMe schedules seeded into the last stage (alone: none)")
    parser.add_argument("--tome-decays", type=float, nargs="*", default=[0.8, 0.85, 0.9], metavar="DECAY",
                        help="decaying ToMe schedules seeded into the last stage (alone: none)")
    parser.add_argument("--tome-first-steps", type=int, nargs="*", default=None, metavar="TOKENS",
                        help="also seed every decay with its first compressible layer merging TOKENS tokens")
    parser.add_argument("--shaped", type=float, default=0.75, help="fraction of ToMe-like shaped candidates")
    parser.add_argument("--targets-at-tome-r", type=int, nargs="+", default=[12, 18], metavar="R",
                        help="use the MACs of constant-r ToMe with these r as the targets (the same MACs exactly)")
    parser.add_argument("--merge-matches", nargs="+", default=["class_attention", "bipartite"],
                        help="merge rules the candidates take in turn (see hf-tome search --help)")
    # ATC's clustering with MLERP: the most accurate merging measured at equal MACs ("Agglomerative clustering"
    # in the README). hf-tome search itself keeps ToMe's bipartite mean, which is faster at the same MACs.
    parser.add_argument("--merge-rule", choices=list(MERGE_RULES), default="agglomerative",
                        help="merge rule of the searched candidates (see hf-tome search --help; default "
                        "agglomerative, where hf-tome search's own default is bipartite)")
    parser.add_argument("--merge-mode", choices=list(MERGE_MODES), default="mlerp",
                        help="merge mode of the searched candidates (default mlerp, where hf-tome search's is "
                        "mean). Constant-r ToMe always runs with ToMe's own rule and mean; with another rule or "
                        "mode it also runs with the searched rows' rule and mode, so both gains are visible")
    parser.add_argument("--prune-matched-layers", type=int, default=None,
                        help="ToFu's pruning layers of the searched candidates (see hf-tome search --help; default "
                        "0); constant-r ToMe then also runs with the searched rows' merging, as for --merge-mode")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--test-images", type=int, default=None, help="default: all 10,000")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless given")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "plots" / "search_vs_tome.png")
    parser.add_argument("--search-out", type=Path, default=None,
                        help="folder of the search's own outputs, its model included (default: "
                             "$HF_TOME_CACHE/search_vs_tome, outside git: weights are never committed)")
    parser.add_argument("--replot", type=Path, nargs="+", default=None, metavar="JSON",
                        help="only plot these runs' search_vs_tome.json together (into --out) and exit")
    parser.add_argument("--neighbours", action="store_true", help="also run the next r (fewer MACs) for the plot")
    parser.add_argument("--tome-curve", type=int, nargs="*", default=[6, 9, 15, 21], metavar="R",
                        help="further constant r (ToMe's rule and mean) for the plot's curve, beside the r paired "
                        "with each searched row (alone: none)")
    args = parser.parse_args(argv)
    defaults = {"search_images": 1024, "val_images": 256, "test_images": 10_000, "batch_size": 64}
    for key, value in {**defaults, **(QUICK if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def _cache_folder() -> Path:
    """Where the search's model goes by default: hf_tome's cache, beside the converted weights."""
    from hf_tome.evaluation.assets.cache import cache_dir

    return cache_dir() / "search_vs_tome"


def main() -> None:
    from accelerate import Accelerator
    from transformers import AutoImageProcessor

    import hf_tome
    from hf_tome.budgets.search import SearchOptions, constant_r_gmacs, run_search
    from hf_tome.budgets.search_eval import CachedEvaluator
    from hf_tome.budgets.search_space import SearchSpace
    from hf_tome.core.macs import nearest_r
    from hf_tome.evaluation.assets.fashion_mnist import load_fashion_mnist
    from hf_tome.evaluation.classification import resolve_dtype
    from hf_tome.integration.registry import find_adapter

    args = parse_args()
    if args.replot:
        replot(args.replot, args.plot)
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    search_payload = None
    if args.targets is None:
        from PIL import Image

        from hf_tome.evaluation.assets.default_model import default_model_path

        source = args.model or args.search_model or str(default_model_path())
        default = hf_tome.AutoModelForImageClassification.from_pretrained(source)
        probe = AutoImageProcessor.from_pretrained(source)(images=Image.new("RGB", (64, 64)), return_tensors="pt")
        size = tuple(int(v) for v in probe["pixel_values"].shape[-2:])
        default_space = SearchSpace.for_shape(find_adapter(default).encoder_shape(default, size))
        args.targets = [constant_r_gmacs(default_space, r) / default_space.full_gmacs
                        for r in args.targets_at_tome_r]
    if args.model is None:
        # the search's own defaults, unless given (or set by --quick)
        given = {key: getattr(args, key) for key in ("candidates", "stage_images", "keep", "eta", "min_images",
                                                     "finalists") if getattr(args, key) is not None}
        options = SearchOptions(model=args.search_model, targets=args.targets, method=args.method,
                                strategy=args.strategy, search_images=args.search_images, val_images=args.val_images,
                                shaped=args.shaped, merge_matches=args.merge_matches,
                                merge_rule=args.merge_rule, merge_mode=args.merge_mode,
                                prune_matched_layers=args.prune_matched_layers,
                                protect_block_0=args.protect_block_0, tome_seeds=args.tome_seeds,
                                tome_decays=args.tome_decays, tome_first_steps=args.tome_first_steps,
                                batch_size=args.batch_size, dtype=args.dtype, out=args.search_out or _cache_folder(),
                                baseline=False, **given)
        search_payload = run_search(options)
        model_dir = search_payload["saved_model"]
    else:
        model_dir = args.model
    model = hf_tome.AutoModelForImageClassification.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    table = model.tome_config.budget_table
    image_size = tuple(model.tome_config.extra.get("budget_image_size", (224, 224)))
    space = SearchSpace.for_shape(find_adapter(model).encoder_shape(model, image_size))
    full = space.full_gmacs
    test = load_fashion_mnist("test", limit=args.test_images)
    dtype = resolve_dtype(args.dtype)
    # The same construction as run_search (the accelerator state is shared): gloo on GPU-less multi-process runs.
    accelerator = Accelerator(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    # The saved settings (merge rule and mode among them) stay; only the table goes: each setting brings its counts.
    saved = model.tome_config
    merging = saved.merging()
    evaluator = CachedEvaluator(hf_tome.apply(model, saved, budget=None, budget_table=None, prune_kept=None,
                                              merge_kept=None), test, processor, accelerator, dtype,
                                args.batch_size, keep_pixels=True)
    tome_merging = dict(MERGE_OPTION_DEFAULTS)
    other_merging = _merging_label(merging)

    def tome_setting(r: int, **extra) -> dict:
        """Constant-r ToMe as published (bipartite, mean), as one test setting."""
        return {"name": f"ToMe r={r}", "gflops": constant_r_gmacs(space, r), "r": r, **tome_merging, **extra}

    settings = [{"name": "full", "gflops": full, "prune_kept": None, "merge_kept": None}]
    for row in sorted(table, key=lambda row: -row["gflops"]):
        if row["fraction"] >= 0.999:
            continue
        settings.append({"name": f"searched {row['fraction']:.2f}", "gflops": row["gflops"],
                         "prune_kept": row["prune_kept"], "merge_kept": row["merge_kept"],
                         "merge_match": row.get("merge_match", "class_attention"), "row": row, **merging})
        # the constant r with the fewest MACs still >= the row's (r=0 always qualifies: rows are <= full)
        at_least = nearest_r(partial(constant_r_gmacs, space), row["gflops"], space.num_tokens - 1, side="at_least")
        for r in (at_least, at_least + 1) if args.neighbours else (at_least,):
            settings.append(tome_setting(r, paired_with=row["fraction"] if r == at_least else None))
        if other_merging:  # the same constant r with the searched rows' rule and mode
            settings.append({"name": f"ToMe r={at_least}, {other_merging}", "gflops": constant_r_gmacs(space, at_least),
                             "r": at_least, "same_merging_with": row["fraction"], **merging})
    for r in args.tome_curve:
        settings.append(tome_setting(r))
    # a name seen twice keeps its first setting, so a curve r that is also a paired one stays paired
    by_name: dict[str, dict] = {}
    for setting in settings:
        by_name.setdefault(setting["name"], setting)
    unique = list(by_name.values())
    timings: list[float] = []
    start = time.perf_counter()
    scores = evaluator.evaluate_from_pixels(unique, args.test_images, "test settings", timings)
    seconds = time.perf_counter() - start
    results = []
    for number, setting in enumerate(unique):
        results.append({"name": setting["name"], "gflops": setting["gflops"], "fraction": setting["gflops"] / full,
                        "accuracy": float(scores[number, 0] / scores[number, 2]),
                        "nll": float(scores[number, 1] / scores[number, 2]), "images": int(scores[number, 2]),
                        "images_per_s": float(scores[number, 2] / timings[number]),
                        "r": setting.get("r"), "paired_with": setting.get("paired_with"),
                        "same_merging_with": setting.get("same_merging_with"),
                        "merge_rule": setting.get("merge_rule", "bipartite"),
                        "merge_mode": setting.get("merge_mode", "mean"),
                        "prune_matched_layers": setting.get("prune_matched_layers", 0),
                        "prune_kept": setting.get("prune_kept"), "merge_kept": setting.get("merge_kept"),
                        "merge_match": setting.get("merge_match"), "origin": setting.get("row", {}).get("origin"),
                        "validation_accuracy": setting.get("row", {}).get("accuracy")})
    lines = ["| setting | GMACs | MACs vs full | test accuracy | test NLL | merge match | origin | tokens leaving each "
             "layer |", "|---|---|---|---|---|---|---|---|"]
    for result in results:
        tokens = result["merge_kept"] or ""
        lines.append(f"| {result['name']} | {result['gflops']:.3f} | {100 * result['fraction']:.1f}% | "
                     f"{100 * result['accuracy']:.2f}% | {result['nll']:.3f} | {result['merge_match'] or ''} | "
                     f"{result['origin'] or ''} | {tokens} |")
    comparison = []
    for result in results:
        if result["name"].startswith("searched"):
            tome = next(r for r in results if r["paired_with"] is not None
                        and abs(r["paired_with"] - result["gflops"] / full) < 1e-9)
            comparison.append({"searched": result["name"], "searched_accuracy": result["accuracy"],
                               "searched_gflops": result["gflops"], "tome": tome["name"],
                               "tome_accuracy": tome["accuracy"], "tome_gflops": tome["gflops"],
                               "points_better": 100 * (result["accuracy"] - tome["accuracy"]),
                               "searched_origin": result["origin"],
                               "at_least_as_accurate": result["accuracy"] >= tome["accuracy"]})
            same = next((r for r in results if r["same_merging_with"] is not None
                         and abs(r["same_merging_with"] - result["gflops"] / full) < 1e-9), None)
            if same is not None:
                comparison[-1].update({
                    "tome_same_merging": same["name"], "tome_same_merging_accuracy": same["accuracy"],
                    "points_better_than_same_merging": 100 * (result["accuracy"] - same["accuracy"])})
    table_text = "\n".join(lines)
    if not accelerator.is_main_process:
        return
    print(table_text)
    for item in comparison:
        print(f"{item['searched']} ({item['searched_gflops']:.3f} GMACs): {100 * item['searched_accuracy']:.2f}% vs "
              f"{item['tome']} ({item['tome_gflops']:.3f} GMACs): {100 * item['tome_accuracy']:.2f}% -> "
              f"{item['points_better']:+.2f} points, "
              f"{'at least as accurate' if item['at_least_as_accurate'] else 'LESS accurate'}"
              + (f"; {item['tome_same_merging']}: {100 * item['tome_same_merging_accuracy']:.2f}% -> "
                 f"{item['points_better_than_same_merging']:+.2f} points" if "tome_same_merging" in item else ""))
    if search_payload is not None:
        stage_seconds = " / ".join(f"{stage['seconds']:.0f}" for stage in search_payload["log"].get("stages", []))
        estimated = search_payload["log"].get("estimate", {}).get("seconds", 0)
        print(f"search: {search_payload['search_seconds']:.0f} s ({search_payload['total_seconds']:.0f} s with the "
              f"validation and saving; estimated {estimated:.0f} s; stages {stage_seconds} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"model": str(model_dir), "test_images": args.test_images, "dtype": str(dtype),
               "threads": torch.get_num_threads(), "full_gflops": full, "image_size": list(image_size),
               "test_seconds": seconds, "results": results, "comparison": comparison, "table": table_text,
               "search": None if search_payload is None else {
                   key: search_payload[key] for key in ("search_seconds", "total_seconds", "rows", "options",
                                                        "processes", "log")}}
    (args.out / "search_vs_tome.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(results, full, args.plot, args.test_images)
    print(f"wrote {args.out / 'search_vs_tome.json'} and {args.plot}")


def _merging_label(setting: dict) -> str:
    """The merging settings of ``setting`` that are not ToMe's, as a row name shows them: "agglomerative, mlerp",
    "pitome", "prune 4"; "" for ToMe's own. A missing key is ToMe's (older runs' JSON has none)."""
    words = []
    for key, default in MERGE_OPTION_DEFAULTS.items():
        value = setting.get(key, default)
        if value != default:
            words.append(f"prune {value}" if key == "prune_matched_layers" else str(value))
    return ", ".join(words)


def plot(results: list[dict], full: float, path: Path, images: int,
         others: dict[str, list[dict]] | None = None, label: str = "prune + merge, searched rates") -> None:
    """Accuracy against GMACs: the searched rows, constant-r ToMe and the full model; ``others`` adds the
    searched rows of further runs on the same test images (label -> their results)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    tome = sorted([r for r in results if r["r"] is not None and not r.get("same_merging_with")],
                  key=lambda r: r["gflops"])
    tome_other = sorted([r for r in results if r.get("same_merging_with")], key=lambda r: r["gflops"])
    base = next(r for r in results if r["name"] == "full")
    series = {label: results, **(others or {})}
    for (name, rows), marker in zip(series.items(), ("o-", "^-", "v-", "D-"), strict=False):
        searched = sorted([r for r in rows if r["name"] != "full" and r["r"] is None], key=lambda r: r["gflops"])
        merging = _merging_label(searched[0]) if searched else ""  # a run's searched rows share their merging
        name = f"{name}, {merging}" if merging else name
        axis.plot([r["gflops"] for r in searched], [100 * r["accuracy"] for r in searched], marker, label=name)
    axis.plot([r["gflops"] for r in tome], [100 * r["accuracy"] for r in tome], "s--", label="ToMe, constant r")
    if tome_other:
        other = tome_other[0]["name"].split(", ", 1)[1]
        axis.plot([r["gflops"] for r in tome_other], [100 * r["accuracy"] for r in tome_other], "x:",
                  label=f"constant r, {other}")
    axis.plot([base["gflops"]], [100 * base["accuracy"]], "k*", markersize=10, label="full model")
    for row in tome:
        axis.annotate(f"r={row['r']}", (row["gflops"], 100 * row["accuracy"]), textcoords="offset points",
                      xytext=(4, -10), fontsize=8)
    axis.set_xlabel(f"GMACs per image (full model {full:.2f})")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title(f"DINOv2-S + Fashion-MNIST head, {images} test images, 224 px", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def replot(paths: list[Path], out: Path) -> None:
    """One plot from several runs' ``search_vs_tome.json`` (the first gives ToMe and the full model)."""
    payloads = [json.loads(Path(path).read_text()) for path in paths]
    if len({payload["test_images"] for payload in payloads}) != 1:
        raise ValueError("the runs were measured on different numbers of test images: expected the same")

    def label(payload: dict) -> str:
        options = (payload.get("search") or {}).get("options") or {}
        method = options.get("method", "random")
        if method != "random":
            return f"prune + merge, {method} search"
        # Runs from before merge_match existed searched the class-attention rule only.
        rules = " + ".join(options.get("merge_matches", ["class_attention"])).replace("_", " ")
        # successive halving leaves candidates unset (its own default); its log has the count it drew
        schedule = (payload.get("search") or {}).get("log", {}).get("schedule", {})
        candidates = options.get("candidates") or schedule.get("candidates")
        return f"random search, {candidates} candidates, {rules}"

    first = payloads[0]
    others = {label(payload): payload["results"] for payload in payloads[1:]}
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(first["results"], first["full_gflops"], out, first["test_images"], others, label(first))
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
