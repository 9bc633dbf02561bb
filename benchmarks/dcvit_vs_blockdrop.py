"""DC-ViT against block dropping at the same MACs, on the embedded DINOv2-S Fashion-MNIST model.

Both compressions use the same unlabeled training images, the same block trial and the same feature-mimicking
fine-tuning (``hf-tome compress --method dc-vit`` / ``--method drop``); the linear head of the original model is
kept as is (no labels are used). Accuracy on Fashion-MNIST test images, images/s of every model measured in the
same run (round-robin rounds, median), MACs from the spec's formula. Prints a table, writes JSON and a plot.

    python benchmarks/dcvit_vs_blockdrop.py --target 0.75 --num-images 500 --test-images 2000

The fine-tuning defaults are the published recipe's (``hf_tome.dcvit.recipe``: 2,000 iterations of batch 64 per
block, colour jitter, 20-epoch warm-up, weight decay 1e-4); ``--budget-minutes`` scales them to the time available
(each of the two compressions gets half of it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

import hf_tome  # noqa: E402
from hf_tome.dcvit.compress import CompressOptions, run_compress  # noqa: E402
from hf_tome.evaluation.assets.default_model import default_model_path  # noqa: E402
from hf_tome.evaluation.classification import evaluate_classifier, preprocess_all, resolve_dtype  # noqa: E402
from hf_tome.evaluation.datasets import load_eval_dataset  # noqa: E402
from hf_tome.evaluation.reporting import machine_info  # noqa: E402


def _images_per_s(models: dict[str, torch.nn.Module], batch: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median images/s of each model over ``rounds`` round-robin rounds (every model timed in every round)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(pixel_values=batch)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(pixel_values=batch)
                times[name].append(time.perf_counter() - start)
    return {name: len(batch) / statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--test-images", type=int, default=2000)
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
    parser.add_argument("--resume", action="store_true", help="continue the runs in --out (e.g. with --final-epochs)")
    parser.add_argument("--metric-images", type=int, default=32)
    parser.add_argument("--metric-steps", type=int, default=40)
    parser.add_argument("--mixed-precision", default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/dcvit"))
    parser.add_argument("--skip-compress", action="store_true", help="reuse the models already in --out")
    args = parser.parse_args()

    base = str(default_model_path())
    runs = {}
    for method in ("dc-vit", "drop"):
        out = args.out / method
        if not args.skip_compress:
            metric_set = args.out / "dc-vit" / "state" / "metric_set.pt"
            if method == "drop" and metric_set.exists():  # the same synthetic metric set for both block trials
                (out / "state").mkdir(parents=True, exist_ok=True)
                shutil.copy(metric_set, out / "state" / "metric_set.pt")
            start = time.perf_counter()
            summary = run_compress(CompressOptions(
                target=args.target, method=method, num_images=args.num_images, out=out,
                iterations_per_block=args.iterations_per_block, final_iterations=args.final_iterations,
                trial_iterations=args.trial_iterations, epochs_per_block=args.epochs_per_block,
                trial_epochs=args.trial_epochs, final_epochs=args.final_epochs, resume=args.resume,
                budget_minutes=None if args.budget_minutes is None else args.budget_minutes / 2,
                batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, pool_copies=args.pool_copies,
                train_scope=args.train_scope, logits_weight=args.logits_weight,
                metric_images=args.metric_images, metric_steps=args.metric_steps,
                mixed_precision=args.mixed_precision))
            summary["wall_seconds"] = time.perf_counter() - start
        else:
            summary = json.loads((out / "compress.json").read_text())
        runs[method] = summary

    dtype = resolve_dtype("auto")
    processor = AutoImageProcessor.from_pretrained(base)
    dataset = load_eval_dataset("fashion-mnist", "test", args.test_images)
    batches = preprocess_all(dataset, processor, 64, dtype)
    models = {"original": hf_tome.AutoModelForImageClassification.from_pretrained(base).eval(),
              "DC-ViT": hf_tome.AutoModelForImageClassification.from_pretrained(args.out / "dc-vit" / "model").eval(),
              "block drop": hf_tome.AutoModelForImageClassification.from_pretrained(args.out / "drop" / "model").eval()}
    rows = []
    for name, model in models.items():
        result = evaluate_classifier(model, dataset, processor, batch_size=64, dtype=dtype, batches=batches,
                                     description=name)
        report = hf_tome.compute_report(model, tuple(batches[0][0].shape[-2:]))
        rows.append({"setting": name, "gmacs": report.gmacs, "accuracy": result.accuracy,
                     "compressed_blocks": getattr(model.config, "block_compression", {}).get("mlp_kept", {})})
    for model in models.values():
        model.to(dtype)
    speed = _images_per_s(models, batches[0][0][:32].to(dtype), args.rounds)
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
               "test_images": len(dataset), "dtype": str(dtype), "machine": machine_info()}
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


if __name__ == "__main__":
    main()
