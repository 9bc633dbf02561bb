"""DC-ViT against block dropping at the same MACs, on the embedded DINOv2-S Fashion-MNIST model.

Both compressions use the same unlabeled training images, the same block trial and the same feature-mimicking
fine-tuning (``hf-tome compress --method dc-vit`` / ``--method drop``); the linear head of the original model is
kept as is (no labels are used). Accuracy on Fashion-MNIST test images, images/s of every model measured in the
same run (round-robin rounds, median), MACs from the spec's formula. Models are evaluated on the GPU when there
is one. Prints a table, writes JSON and two plots: accuracy against GMACs with the fine-tuning losses, and test
accuracy against the fine-tuning iterations so far (``--curve-points``: after every per-block phase and at evenly
spaced steps of the final phase, through ``run_compress``'s ``on_checkpoint``; the JSON's ``curve``).

    python benchmarks/dcvit_vs_blockdrop.py --target 0.75 --num-images 500 --test-images 2000

The fine-tuning defaults are the published recipe's (``hf_tome.dcvit.recipe``: 2,000 iterations of batch 64 per
block, colour jitter, 20-epoch warm-up, weight decay 1e-4); ``--budget-minutes`` scales them to the time available
(each of the two compressions gets half of it).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

import hf_tome  # noqa: E402
from hf_tome.dcvit.compress import CompressOptions, _load_model, load_unlabeled_pixels, run_compress  # noqa: E402
from hf_tome.dcvit.trial import activation_importance, compress_block, per_block_iterations  # noqa: E402
from hf_tome.evaluation.assets.default_model import default_model_path  # noqa: E402
from hf_tome.evaluation.classification import evaluate_classifier, preprocess_all, resolve_dtype  # noqa: E402
from hf_tome.evaluation.datasets import load_eval_dataset  # noqa: E402
from hf_tome.evaluation.reporting import machine_info  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(models: dict[str, torch.nn.Module], batch: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median images/s of each model over ``rounds`` round-robin rounds (every model timed in every round)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(pixel_values=batch)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                _sync(batch.device)
                start = time.perf_counter()
                model(pixel_values=batch)
                _sync(batch.device)
                times[name].append(time.perf_counter() - start)
    return {name: len(batch) / statistics.median(values) for name, values in times.items()}


METHOD_COLORS = {"dc-vit": "tab:blue", "drop": "tab:orange"}
METHOD_LABELS = {"dc-vit": "DC-ViT", "drop": "block drop"}


def curve_recorder(method: str, evaluate: Callable[[torch.nn.Module], float], images: int,
                   points: list[dict]) -> Callable[[int, torch.nn.Module], None]:
    """A ``run_compress`` ``on_checkpoint`` hook: appends ``{method, iterations, accuracy, images}`` to ``points``,
    the accuracy from ``evaluate`` on a copy of the student (free to change its dtype and device)."""
    def record(iterations: int, student: torch.nn.Module) -> None:
        accuracy = evaluate(copy.deepcopy(student))
        points.append({"method": method, "iterations": iterations, "accuracy": accuracy, "images": images})
        print(f"{method}: {accuracy:.2%} after {iterations} fine-tuning iterations ({images} test images)")
    return record


def merge_curve(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` points (a run being resumed) with ``new`` ones replacing those at the same iterations, in order."""
    kept = {point["iterations"]: point for point in old}
    kept.update({point["iterations"]: point for point in new})
    return [kept[iterations] for iterations in sorted(kept)]


def untrained_starts(base: str, runs: dict[str, dict], num_images: int, processor,
                     evaluate: Callable[[torch.nn.Module], float], images: int) -> list[dict]:
    """Accuracy of every compressed model before any fine-tuning: the blocks and widths each run chose, compressed
    at once (shallow to deep) from the original, DC-ViT's blocks both with the published init (the kept units'
    trained weights) and with the least-squares refit on the same unlabeled images, block dropping as is."""
    original = _load_model(base)
    pixels, _ = load_unlabeled_pixels(CompressOptions(num_images=num_images), processor)
    importance = activation_importance(original, pixels[:64])  # what run_compress uses
    variants = [("dc-vit", "published"), ("dc-vit", "least-squares"), ("drop", "published")]
    starts = []
    for method, init in variants:
        if method not in runs:
            continue
        student = copy.deepcopy(original)
        widths = {int(block): units for block, units in runs[method]["block_compression"]["mlp_kept"].items()}
        for block in sorted(widths):
            compress_block(student, original, block, widths[block], pixels, None, importance, init)
        accuracy = evaluate(student)
        starts.append({"method": method, "init": init, "iterations": 0, "accuracy": accuracy, "images": images})
        print(f"{method}, {init} init, no fine-tuning: {accuracy:.2%} ({images} test images)")
    return starts


START_MARKERS = {("dc-vit", "published"): ("tab:blue", "x", "DC-ViT, published init, no fine-tuning"),
                 ("dc-vit", "least-squares"): ("tab:blue", "*", "DC-ViT, least-squares init, no fine-tuning"),
                 ("drop", "published"): ("tab:orange", "x", "block drop, no fine-tuning")}


def plot_curve(curve: list[dict], original_accuracy: float, block_iterations: dict[str, int], title: str,
               path: Path, starts: list[dict] | None = None) -> None:
    """Test accuracy against fine-tuning iterations, a line per method, the original model's accuracy as a
    horizontal line and, where a final phase follows, a dotted line where the per-block phases end."""
    figure, axes = plt.subplots(figsize=(6.5, 4))
    for method, color in METHOD_COLORS.items():
        points = sorted((p for p in curve if p["method"] == method), key=lambda p: p["iterations"])
        if points:
            axes.plot([p["iterations"] for p in points], [100 * p["accuracy"] for p in points], marker="o",
                      color=color, label=METHOD_LABELS[method])
        if method in block_iterations and any(p["iterations"] > block_iterations[method] for p in points):
            axes.axvline(block_iterations[method], color=color, linestyle=":", linewidth=1)
    for start in starts or []:
        color, marker, label = START_MARKERS[(start["method"], start["init"])]
        axes.scatter([0], [100 * start["accuracy"]], color=color, marker=marker, s=70, label=label, zorder=3)
    axes.axhline(100 * original_accuracy, color="black", linestyle="--", label="original")
    axes.set(xlabel="fine-tuning iterations so far (per-block phases, then final; dotted: final starts)",
             ylabel="Fashion-MNIST test accuracy (%)", title=title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--curve-points", type=int, default=4, help="test-accuracy points in the final fine-tuning "
                        "phase (besides one after every per-block phase; 0: no accuracy-against-iterations curve)")
    parser.add_argument("--curve-test-images", type=int, default=None,
                        help="test images per curve point (default: --test-images, so the last point is the table's)")
    defaults = CompressOptions()
    parser.add_argument("--iterations-per-block", type=int, default=defaults.iterations_per_block)
    parser.add_argument("--final-iterations", type=int, default=defaults.final_iterations)
    parser.add_argument("--trial-iterations", type=int, default=defaults.trial_iterations)
    parser.add_argument("--epochs-per-block", type=float, default=None, help="deprecated alias (epochs of the images)")
    parser.add_argument("--final-epochs", type=float, default=None, help="deprecated alias (epochs of the images)")
    parser.add_argument("--trial-epochs", type=float, default=None, help="deprecated alias (epochs of the images)")
    parser.add_argument("--budget-minutes", type=float, default=None, help="for both compressions together")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--pool-copies", type=int, default=defaults.pool_copies)
    parser.add_argument("--train-scope", choices=["prefix", "local"], default=defaults.train_scope)
    parser.add_argument("--logits-weight", type=float, default=defaults.logits_weight)
    parser.add_argument("--init", choices=["least-squares", "published"], default=defaults.init,
                        help="DC-ViT's init of a compressed block (block dropping has nothing to init)")
    parser.add_argument("--no-starts", action="store_true", help="skip the accuracy of every compressed model "
                        "before fine-tuning (both DC-ViT inits and block dropping, on the curve's test images)")
    parser.add_argument("--resume", action="store_true", help="continue the runs in --out (e.g. with --final-epochs)")
    parser.add_argument("--metric-images", type=int, default=32)
    parser.add_argument("--metric-steps", type=int, default=40)
    parser.add_argument("--mixed-precision", default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/dcvit"))
    parser.add_argument("--skip-compress", action="store_true", help="reuse the models already in --out")
    args = parser.parse_args()

    base = str(default_model_path())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype("auto", device)
    processor = AutoImageProcessor.from_pretrained(base)
    dataset = load_eval_dataset("fashion-mnist", "test", args.test_images)
    batches = preprocess_all(dataset, processor, 64, dtype)
    curve_images = args.curve_test_images or args.test_images
    if curve_images == args.test_images:
        curve_dataset, curve_batches = dataset, batches
    else:
        curve_dataset = load_eval_dataset("fashion-mnist", "test", curve_images)
        curve_batches = preprocess_all(curve_dataset, processor, 64, dtype)

    def curve_accuracy(model: torch.nn.Module) -> float:
        return evaluate_classifier(model.to(device), curve_dataset, processor, batch_size=64, dtype=dtype,
                                   batches=curve_batches, description="curve point").accuracy

    runs, curve = {}, []
    for method in ("dc-vit", "drop"):
        out = args.out / method
        curve_file = out / "curve.json"  # this method's points, kept for --resume and --skip-compress
        if curve_file.exists() and not (args.resume or args.skip_compress):
            curve_file.unlink()  # a fresh compression: the old points describe another run
        saved_curve = json.loads(curve_file.read_text()) if curve_file.exists() and args.curve_points > 0 else []
        points: list[dict] = []
        if not args.skip_compress:
            metric_set = args.out / "dc-vit" / "state" / "metric_set.pt"
            if method == "drop" and metric_set.exists():  # the same synthetic metric set for both block trials
                (out / "state").mkdir(parents=True, exist_ok=True)
                shutil.copy(metric_set, out / "state" / "metric_set.pt")
            hook = None if args.curve_points <= 0 else curve_recorder(method, curve_accuracy, len(curve_dataset),
                                                                       points)
            start = time.perf_counter()
            summary = run_compress(CompressOptions(
                target=args.target, method=method, num_images=args.num_images, out=out,
                iterations_per_block=args.iterations_per_block, final_iterations=args.final_iterations,
                trial_iterations=args.trial_iterations, epochs_per_block=args.epochs_per_block,
                trial_epochs=args.trial_epochs, final_epochs=args.final_epochs, resume=args.resume,
                budget_minutes=None if args.budget_minutes is None else args.budget_minutes / 2,
                batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, pool_copies=args.pool_copies,
                train_scope=args.train_scope, logits_weight=args.logits_weight, init=args.init,
                metric_images=args.metric_images, metric_steps=args.metric_steps,
                mixed_precision=args.mixed_precision), on_checkpoint=hook, final_checkpoints=args.curve_points)
            summary["wall_seconds"] = time.perf_counter() - start  # curve points included
        else:
            summary = json.loads((out / "compress.json").read_text())
        runs[method] = summary
        method_curve = merge_curve(saved_curve, points)
        if points:
            curve_file.write_text(json.dumps(method_curve, indent=1))
        curve += method_curve

    starts = [] if args.no_starts else untrained_starts(base, runs, args.num_images, processor, curve_accuracy,
                                                        len(curve_dataset))
    load = hf_tome.AutoModelForImageClassification.from_pretrained
    models = {name: load(path).eval().to(device) for name, path in (
        ("original", base), ("DC-ViT", args.out / "dc-vit" / "model"), ("block drop", args.out / "drop" / "model"))}
    rows = []
    for name, model in models.items():
        result = evaluate_classifier(model, dataset, processor, batch_size=64, dtype=dtype, batches=batches,
                                     description=name)
        report = hf_tome.compute_report(model, tuple(batches[0][0].shape[-2:]))
        rows.append({"setting": name, "gmacs": report.gmacs, "accuracy": result.accuracy,
                     "compressed_blocks": getattr(model.config, "block_compression", {}).get("mlp_kept", {})})
    for model in models.values():
        model.to(dtype)
    speed = _images_per_s(models, batches[0][0][:32].to(device=device, dtype=dtype), args.rounds)
    full = rows[0]["gmacs"]
    for row in rows:
        row["macs_fraction"] = row["gmacs"] / full
        row["images_per_s"] = speed[row["setting"]]
        row["speedup"] = speed[row["setting"]] / speed["original"]

    print(f"\n{'setting':<12} {'GMACs':>7} {'MACs':>6} {'accuracy':>9} {'img/s':>7} {'speed-up':>8}  blocks")
    for row in rows:
        print(f"{row['setting']:<12} {row['gmacs']:7.3f} {row['macs_fraction']:6.1%} {row['accuracy']:9.2%} "
              f"{row['images_per_s']:7.1f} {row['speedup']:7.2f}x  {row['compressed_blocks']}")
    payload = {"rows": rows, "runs": {m: {k: v for k, v in s.items() if k != "losses"} for m, s in runs.items()},
               "losses": {m: s.get("losses") for m, s in runs.items()}, "args": {k: str(v) for k, v in
                                                                               vars(args).items()},
               "test_images": len(dataset), "dtype": str(dtype), "device": str(device), "curve": curve,
               "untrained_starts": starts,
               "curve_original_accuracy": None, "machine": machine_info()}
    if curve or starts:
        payload["curve_original_accuracy"] = (rows[0]["accuracy"] if curve_dataset is dataset
                                              else curve_accuracy(copy.deepcopy(models["original"])))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dcvit_vs_blockdrop.json").write_text(json.dumps(payload, indent=1))

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"original": "black", "DC-ViT": "tab:blue", "block drop": "tab:orange"}
    for row in rows:
        left.scatter(row["gmacs"], row["accuracy"] * 100, s=60, color=colors[row["setting"]], label=row["setting"])
    left.set(xlabel="GMACs per image", ylabel="Fashion-MNIST test accuracy (%)",
             title=f"DINOv2-S, {args.num_images} unlabeled images")
    left.legend()
    for method, color in (("dc-vit", "tab:blue"), ("drop", "tab:orange")):
        losses = [loss for block_losses in (runs[method].get("losses") or {}).values() for loss in block_losses]
        right.plot(losses, color=color, label=f"{method} fine-tuning")
    right.set(xlabel="step (blocks one after another)", ylabel="feature MSE to the original", yscale="log",
              title="feature mimicking")
    right.legend()
    figure.tight_layout()
    plot_dir = Path(__file__).parent / "plots"
    plot_dir.mkdir(exist_ok=True)
    figure.savefig(plot_dir / "dcvit_vs_blockdrop.png", dpi=120)
    print(f"wrote {args.out / 'dcvit_vs_blockdrop.json'} and {plot_dir / 'dcvit_vs_blockdrop.png'}")
    if curve or starts:
        block_iterations = {method: per_block_iterations(summary.get("losses") or {})
                            for method, summary in runs.items()}
        curve_path = plot_dir / "dcvit_accuracy_vs_iterations.png"
        plot_curve(curve, payload["curve_original_accuracy"], block_iterations,
                   f"DINOv2-S at {args.target:g} of the MACs, {args.num_images} unlabeled images", curve_path,
                   starts)
        print(f"wrote {curve_path}")


if __name__ == "__main__":
    main()
