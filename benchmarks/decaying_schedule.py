"""Decaying merge schedules against constant r at equal MACs, with ToMe's mean and with MLERP (issue 19).

For each MACs reduction (default 1.5x and 2x) the constant r that reaches it is found once
(``constant_r_for_reductions``); its MACs are the target every row of that reduction meets or undercuts. A decaying
schedule merges about ``scale * decay ** i`` tokens in layer ``i`` (``hf_tome.core.schedule.decaying_schedule``),
with ``scale`` fitted to the target (``hf_tome.integration.flops.decaying_r_for_macs``).

1. **Selection, on training images.** Every ``--decays`` value (1.0 is constant r), with every
   ``--prune-layers`` count (ToFu's pruning in that many first layers, ``ToMeConfig.prune_matched_layers``; the
   default 0 only merges), runs with MLERP on ``--select-images`` Fashion-MNIST *training* images from index
   ``--select-start`` (far past the images the embedded model's head was fitted on). Per reduction the most
   accurate decay without pruning is chosen, and the most accurate (decay, prune layers) pair (ties: the larger
   decay, i.e. the flatter schedule, then fewer pruning layers). No test image takes part in the choice.
   ``--first-steps`` adds, for every decay, schedules whose layer 0 merges that many tokens with the other layers
   fitted around it (``decaying_r_for_macs(first=...)``); the chosen schedule may then be one of them.
2. **Test, on all 10,000 test images.** The unreduced model; then per reduction ToMe's constant r as published
   (mean), constant r with MLERP, the chosen decay with the mean and with MLERP, so the schedule's and MLERP's
   shares of the gain can be told apart, and the chosen pair with MLERP when it prunes. When the chosen schedule
   has a first step, the best plain decaying one runs too, with MLERP. ``--merge-rules agglomerative`` adds, per
   rule, constant r and the chosen schedule with that rule (``ToMeConfig.merge_rule``) and MLERP; the schedule is
   the one chosen with ToMe's bipartite matching. Images/s are those of the same test passes (the first batch is a
   warm-up), compared with constant-r ToMe at the same target.

Writes ``--out`` (JSON) and a plot of test accuracy against GMACs.

    python benchmarks/decaying_schedule.py --threads 2                 # the README's run (about 25 minutes here)
    python benchmarks/decaying_schedule.py --threads 2 --prune-layers 0 2 3 4 5 6 \
        --out benchmarks/results/prune_matched_layers.json --plot benchmarks/plots/prune_matched_layers.png
    python benchmarks/decaying_schedule.py --threads 2 --speedups 2 --decays 0.85 0.9 --first-steps 40 46 52 \
        --select-images 10000 --out benchmarks/results/first_step_schedule.json \
        --plot benchmarks/plots/first_step_schedule.png
    python benchmarks/decaying_schedule.py --threads 2 --speedups 2 --decays 0.85 --merge-rules agglomerative \
        --out benchmarks/results/agglomerative_schedule.json --plot benchmarks/plots/agglomerative_schedule.png
    python benchmarks/decaying_schedule.py --limit 256 --select-images 128 --out /tmp/d.json --plot /tmp/d.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from allocator_option import add_allocator_option, apply_allocator_option
from merge_rules import _evaluate, plot_accuracy_curves, split_batches

import hf_tome
from hf_tome.config import MERGE_RULES
from hf_tome.evaluation.classification import resolve_dtype
from hf_tome.evaluation.reporting import machine_info
from hf_tome.integration.flops import constant_r_for_reductions, decaying_r_for_macs

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="image classifier folder (default: embedded model)")
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0],
                        help="MACs reductions; each is met at the MACs of the constant r that reaches it")
    parser.add_argument("--decays", type=float, nargs="+", default=[0.8, 0.85, 0.9, 1.0],
                        help="decays tried on the training images (1.0: constant r)")
    parser.add_argument("--prune-layers", type=int, nargs="+", default=[0],
                        help="ToFu pruning layers tried with every decay (ToMeConfig.prune_matched_layers)")
    parser.add_argument("--first-steps", type=int, nargs="+", default=[],
                        help="also try every decay with layer 0 merging this many tokens and the other layers "
                             "fitted around it (decaying_r_for_macs(first=...))")
    parser.add_argument("--merge-rules", nargs="+", default=[], choices=[r for r in MERGE_RULES if r != "bipartite"],
                        help="other merge rules to test, with MLERP, at constant r and at the chosen schedule")
    parser.add_argument("--select-images", type=int, default=2000, help="training images for choosing the decay")
    parser.add_argument("--select-start", type=int, default=40000,
                        help="first training image used for the choice (the head was fitted on the first ones)")
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    add_allocator_option(parser, "forwards then page-fault in fresh memory, which slows every row")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/decaying_schedule.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/plots/decaying_schedule.png")
    args = parser.parse_args(argv)
    bad = [decay for decay in args.decays if not 0.0 < decay <= 1.0]
    if bad:
        parser.error(f"--decays {bad} are invalid: expected factors in (0, 1]")
    if 0 not in args.prune_layers or min(args.prune_layers) < 0:
        parser.error(f"--prune-layers {args.prune_layers} is invalid: expected counts >= 0, including 0")
    if any(step < 0 for step in args.first_steps):
        parser.error(f"--first-steps {args.first_steps} is invalid: expected token counts >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    kept_freed_memory = apply_allocator_option(args)
    from transformers import AutoImageProcessor

    if args.model is None:
        from hf_tome.evaluation.assets.default_model import default_model_path

        args.model = default_model_path()
    device = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    model = hf_tome.AutoModelForImageClassification.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    start = time.perf_counter()
    select = split_batches(processor, "train", args.select_start, args.select_start + args.select_images,
                           args.batch_size, dtype)
    test = split_batches(processor, "test", 0, args.limit, args.batch_size, dtype)
    constant_r = constant_r_for_reductions(model, args.speedups)
    full_macs = hf_tome.compute_report(model, config=hf_tome.ToMeConfig(r=0)).total_macs

    selections = []
    for speedup, r in constant_r.items():
        target = hf_tome.compute_report(model, config=hf_tome.ToMeConfig(r=r)).total_macs
        tried = []
        # flattest first, then the plain geometric step, then fewest pruning layers: max() keeps the first of equals
        for decay in sorted(args.decays, reverse=True):
            for first in [None, *sorted(args.first_steps)]:
                constant = decay == 1.0 and first is None
                schedule = r if constant else decaying_r_for_macs(model, target, decay, first=first)
                for layers in sorted(args.prune_layers):
                    hf_tome.apply(model, hf_tome.ToMeConfig(r=schedule, merge_mode="mlerp",
                                                            prune_matched_layers=layers))
                    accuracy, _ = _evaluate(model, select, device, dtype,
                                            f"select {speedup:g}x decay={decay:g} first={first} prune={layers}")
                    tried.append({"decay": decay, "first_step": first, "prune_matched_layers": layers,
                                  "schedule": schedule, "gmacs": hf_tome.compute_report(model).gmacs,
                                  "select_accuracy": accuracy})
                    print(f"select {speedup:g}x  decay {decay:4.2f}  first {first}  prune {layers}  {schedule}  "
                          f"accuracy {100 * accuracy:6.2f}%")
        best = max((row for row in tried if row["prune_matched_layers"] == 0), key=lambda row: row["select_accuracy"])
        plain = max((row for row in tried if row["prune_matched_layers"] == 0 and row["first_step"] is None),
                    key=lambda row: row["select_accuracy"])
        pair = max(tried, key=lambda row: row["select_accuracy"])
        selections.append({"speedup": speedup, "constant_r": r, "target_gmacs": target / 1e9, "tried": tried,
                           "chosen_decay": best["decay"], "chosen_first_step": best["first_step"],
                           "chosen_schedule": best["schedule"],
                           "plain_decay": plain["decay"], "plain_schedule": plain["schedule"],
                           "chosen_pair": {key: pair[key] for key in ("decay", "first_step", "prune_matched_layers",
                                                                      "schedule")}})

    rows = []

    def run(name: str, schedule: int | list[int], mode: str, speedup: float | None, prune_layers: int = 0,
            rule: str = "bipartite") -> None:
        hf_tome.apply(model, hf_tome.ToMeConfig(r=schedule, merge_mode=mode, prune_matched_layers=prune_layers,
                                                merge_rule=rule))
        accuracy, images_per_s = _evaluate(model, test, device, dtype, name)
        report = hf_tome.compute_report(model)
        rows.append({"setting": name, "speedup_target": speedup, "r": schedule, "merge_rule": rule, "merge_mode": mode,
                     "prune_matched_layers": prune_layers,
                     "gmacs": report.gmacs, "macs_fraction": report.total_macs / full_macs,
                     "tokens_per_layer": report.tokens_in, "accuracy": accuracy, "images_per_s": images_per_s})
        print(f"{name:34s} GMACs {report.gmacs:6.3f}  accuracy {100 * accuracy:6.2f}%  {images_per_s:7.1f} img/s")

    run("unreduced", 0, "mean", None)
    for selection in selections:
        speedup, r, decay = selection["speedup"], selection["constant_r"], selection["chosen_decay"]
        first = selection["chosen_first_step"]
        shape = _shape_name(decay, first, r)
        decaying = decay != 1.0 or first is not None  # decay 1.0 without a first step is constant r
        run(f"ToMe r={r}", r, "mean", speedup)
        run(f"ToMe r={r}, MLERP", r, "mlerp", speedup)
        if decaying:  # constant r ran just above
            run(shape, selection["chosen_schedule"], "mean", speedup)
            run(f"{shape}, MLERP", selection["chosen_schedule"], "mlerp", speedup)
        if first is not None and selection["plain_decay"] != 1.0:  # the best geometric one, for comparison
            run(f"decay {selection['plain_decay']:g}, MLERP", selection["plain_schedule"], "mlerp", speedup)
        pair = selection["chosen_pair"]
        if pair["prune_matched_layers"]:
            pair_shape = _shape_name(pair["decay"], pair["first_step"], r)
            run(f"{pair_shape}, prune {pair['prune_matched_layers']}, MLERP", pair["schedule"], "mlerp", speedup,
                pair["prune_matched_layers"])
        for rule in args.merge_rules:
            run(f"ToMe r={r}, {rule}, MLERP", r, "mlerp", speedup, rule=rule)
            if decaying:
                run(f"{shape}, {rule}, MLERP", selection["chosen_schedule"], "mlerp", speedup, rule=rule)
    hf_tome.remove(model)
    base = rows[0]
    for row in rows:
        row["accuracy_drop_points"] = 100 * (base["accuracy"] - row["accuracy"])
        tome = next((other for other in rows if other["speedup_target"] == row["speedup_target"]
                     and other["setting"].startswith("ToMe") and other["merge_mode"] == "mean"
                     and other["merge_rule"] == "bipartite"), None)
        row["images_per_s_vs_tome"] = None if tome is None else row["images_per_s"] / tome["images_per_s"]
    _print_table(rows)
    num_images = sum(len(labels) for _, labels in test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": args.model.name, "dtype": str(dtype), "threads": torch.get_num_threads(),
        "keep_freed_memory": kept_freed_memory, "batch_size": args.batch_size, "num_test_images": num_images,
        "select_split": "train", "select_start": args.select_start, "select_images": args.select_images,
        "first_steps": args.first_steps, "merge_rules": args.merge_rules,
        "selections": selections, "rows": rows, "seconds": time.perf_counter() - start, "machine": machine_info(),
    }, indent=2))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    _plot(rows, args.plot, f"{args.model.name}: {num_images} test images, {dtype}", args.merge_rules)
    print(f"wrote {args.out}")


def _shape_name(decay: float, first: int | None, r: int) -> str:
    """``decay 0.85`` for a plain decaying schedule, ``decay 0.85, first 46`` with a fixed first step, ``ToMe r=21``
    for decay 1 without one (constant r)."""
    if first is not None:
        return f"decay {decay:g}, first {first}"
    return f"ToMe r={r}" if decay == 1.0 else f"decay {decay:g}"


def _print_table(rows: list[dict]) -> None:
    print("\n| setting | GMACs | MACs | accuracy | drop (points) | images/s | vs ToMe images/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        versus = "-" if row["images_per_s_vs_tome"] is None else f"{row['images_per_s_vs_tome']:.2f}x"
        print(f"| {row['setting']} | {row['gmacs']:.3f} | {100 * row['macs_fraction']:.1f}% | "
              f"{100 * row['accuracy']:.2f}% | {row['accuracy_drop_points']:.2f} | {row['images_per_s']:.1f} | "
              f"{versus} |")


def _plot(rows: list[dict], path: Path, title: str, merge_rules: list[str]) -> None:
    base = rows[0]
    series = {"ToMe (constant r, mean)": ("ToMe", "mean", False, "bipartite"),
              "constant r, MLERP": ("ToMe", "mlerp", False, "bipartite"),
              "decaying, mean": ("decay", "mean", False, "bipartite"),
              "decaying, MLERP": ("decay", "mlerp", False, "bipartite"),
              "decaying with a first step, mean": ("decay", "mean", True, "bipartite"),
              "decaying with a first step, MLERP": ("decay", "mlerp", True, "bipartite")}
    for rule in merge_rules:
        series[f"constant r, {rule}, MLERP"] = ("ToMe", "mlerp", False, rule)
        series[f"decaying, {rule}, MLERP"] = ("decay", "mlerp", False, rule)
        series[f"decaying with a first step, {rule}, MLERP"] = ("decay", "mlerp", True, rule)
    curves = {label: sorted([(base["gmacs"], 100 * base["accuracy"])]
                            + [(row["gmacs"], 100 * row["accuracy"]) for row in rows
                               if row["setting"].startswith(prefix) and row["merge_mode"] == mode
                               and row["merge_rule"] == rule and (", first " in row["setting"]) == first
                               and not row.get("prune_matched_layers")])
              for label, (prefix, mode, first, rule) in series.items()}
    curves = {label: points for label, points in curves.items() if len(points) > 1}  # only the series that ran
    # only where the choice pruned: its points alone, not a line through the unreduced model
    pruning = sorted((row["gmacs"], 100 * row["accuracy"]) for row in rows if row.get("prune_matched_layers"))
    plot_accuracy_curves(curves, path, title, {"chosen schedule + ToFu pruning, MLERP": pruning})


if __name__ == "__main__":
    main()
