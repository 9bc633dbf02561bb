"""ToMe's bipartite matching against PiToMe's energy rule and MLERP merging, at equal MACs, on the default model.

For each MACs fraction (default 1/1.5 and 1/2 of the unreduced model) the constant r that reaches it is found once
(``constant_r_for_macs``); every rule then runs with that same r, so every rule removes the same tokens per layer
and costs the same MACs (the rules only change *which* tokens merge and *how* they are combined). Rows:

- ``tome``: ``merge_rule="bipartite"``, ``merge_mode="mean"`` (the default)
- ``pitome``: PiToMe's energy score picks the merge candidates (``merge_rule="pitome"``)
- ``mlerp``: ToMe's matching, norm-preserving merge (``merge_mode="mlerp"``)
- ``pitome+mlerp``: both
- ``atc``, ``atc+mlerp``: ATC's average-linkage clustering picks the merges (``merge_rule="agglomerative"``), with
  the mean or MLERP

Accuracy on the Fashion-MNIST test split (all 10,000 images by default) and images/s of the forward passes, with
the unreduced model as reference. Writes ``--out`` (JSON) and a plot of accuracy against GMACs.

    python benchmarks/merge_rules.py                                   # CPU, bf16 where supported, 10k images
    python benchmarks/merge_rules.py --device cuda --batch-size 256    # accuracy on a GPU
    python benchmarks/merge_rules.py --limit 256 --out /tmp/m.json     # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from allocator_option import add_allocator_option, apply_allocator_option

import hf_tome
from hf_tome.evaluation.classification import resolve_dtype
from hf_tome.evaluation.reporting import machine_info
from hf_tome.integration.flops import constant_r_for_macs

ROOT = Path(__file__).resolve().parents[1]
RULES = {"tome": ("bipartite", "mean"), "pitome": ("pitome", "mean"), "mlerp": ("bipartite", "mlerp"),
         "pitome+mlerp": ("pitome", "mlerp"), "atc": ("agglomerative", "mean"), "atc+mlerp": ("agglomerative", "mlerp")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="image classifier folder (default: embedded model)")
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0],
                        help="MACs reductions: each row runs at 1/speedup of the unreduced model's MACs")
    parser.add_argument("--rules", nargs="+", default=list(RULES)[:4], choices=list(RULES),
                        help="rules to run (default: the four of the README's table)")
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    add_allocator_option(parser, "forwards then page-fault in fresh memory, which slows every row on a CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/merge_rules.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/plots/merge_rules.png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept_freed_memory = apply_allocator_option(args)
    from transformers import AutoImageProcessor

    if args.model is None:
        from hf_tome.evaluation.assets.default_model import default_model_path

        args.model = default_model_path()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = hf_tome.AutoModelForImageClassification.from_pretrained(args.model).eval().to(device)
    processor = AutoImageProcessor.from_pretrained(args.model)
    batches = _test_batches(processor, args.limit, args.batch_size, dtype)
    num_images = sum(len(labels) for _, labels in batches)
    rows = []

    def run(name: str, r: int, rule: str, mode: str, speedup: float | None) -> None:
        config = hf_tome.ToMeConfig(r=r, merge_rule=rule, merge_mode=mode)
        hf_tome.apply(model, config)
        accuracy, images_per_s = _evaluate(model, batches, device, dtype, f"{name} r={r}")
        report = hf_tome.compute_report(model)
        rows.append({"rule": name, "merge_rule": rule, "merge_mode": mode, "r": r, "speedup_target": speedup,
                     "gmacs": report.gmacs, "tokens_per_layer": report.tokens_in, "accuracy": accuracy,
                     "images_per_s": images_per_s})
        print(f"{name:14s} r={r:3d}  GMACs {report.gmacs:6.3f}  accuracy {100 * accuracy:6.2f}%  "
              f"{images_per_s:8.1f} img/s")

    start = time.perf_counter()
    run("unreduced", 0, "bipartite", "mean", None)
    for speedup in args.speedups:
        r = constant_r_for_macs(model, 1 / speedup)
        for name in args.rules:
            run(name, r, *RULES[name], speedup)
    hf_tome.remove(model)
    base = rows[0]
    for row in rows:
        row["accuracy_drop_points"] = 100 * (base["accuracy"] - row["accuracy"])
        row["images_per_s_vs_tome"] = None
        tome = next((other for other in rows if other["rule"] == "tome" and other["r"] == row["r"]), None)
        if tome is not None:
            row["images_per_s_vs_tome"] = row["images_per_s"] / tome["images_per_s"]
    print("\n| rule | r | GMACs | accuracy | drop (points) | images/s | vs ToMe images/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        versus = "-" if row["images_per_s_vs_tome"] is None else f"{row['images_per_s_vs_tome']:.2f}x"
        print(f"| {row['rule']} | {row['r']} | {row['gmacs']:.2f} | {100 * row['accuracy']:.2f}% | "
              f"{row['accuracy_drop_points']:.2f} | {row['images_per_s']:.1f} | {versus} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model.name, "device": args.device, "dtype": str(dtype),
                                    "keep_freed_memory": kept_freed_memory,
                                    "batch_size": args.batch_size, "num_images": num_images,
                                    "seconds": time.perf_counter() - start, "machine": machine_info(),
                                    "rows": rows}, indent=2))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    _plot(rows, args.plot, f"{args.model.name}: {num_images} test images, {args.device}")
    print(f"wrote {args.out}")


def _test_batches(processor, limit: int | None, batch_size: int,
                  dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The Fashion-MNIST test images (the first ``limit``), preprocessed once."""
    return split_batches(processor, "test", 0, limit, batch_size, dtype)


def split_batches(processor, split: str, start: int, stop: int | None, batch_size: int,
                  dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images ``start:stop`` of a Fashion-MNIST split with their labels, preprocessed once in batches (read straight
    from the idx files: no datasets library, so the script also runs where only torch and transformers are
    installed, such as a lent GPU machine)."""
    import io

    from PIL import Image
    from tqdm import tqdm

    from hf_tome.evaluation.assets.fashion_mnist import fashion_mnist_pngs

    pngs, labels = fashion_mnist_pngs(split, limit=stop)
    pngs, labels = pngs[start:], labels[start:]
    batches = []
    for first in tqdm(range(0, len(pngs), batch_size), desc=f"preprocessing ({split})", unit="batch"):
        images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs[first:first + batch_size]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(dtype)
        batches.append((pixel_values, torch.as_tensor(labels[first:first + batch_size], dtype=torch.long)))
    return batches


def _evaluate(model: torch.nn.Module, batches: list, device: torch.device, dtype: torch.dtype,
              description: str) -> tuple[float, float]:
    """Top-1 accuracy and forward images/s (the first batch is a warm-up and not timed)."""
    from tqdm import tqdm

    model.to(dtype)
    correct, seconds, timed = 0, 0.0, 0
    with torch.inference_mode():
        for index, (pixel_values, labels) in enumerate(tqdm(batches, desc=description, unit="batch")):
            pixel_values = pixel_values.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            predictions = model(pixel_values=pixel_values).logits.argmax(-1).cpu()
            if index > 0 or len(batches) == 1:
                seconds, timed = seconds + time.perf_counter() - start, timed + len(labels)
            correct += int((predictions == labels).sum())
    return correct / sum(len(labels) for _, labels in batches), timed / max(seconds, 1e-9)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    curves = {name: sorted((row["gmacs"], 100 * row["accuracy"]) for row in rows
                           if row["rule"] in (name, "unreduced")) for name in RULES}
    plot_accuracy_curves(curves, path, title)


def plot_accuracy_curves(curves: dict[str, list[tuple[float, float]]], path: Path, title: str,
                         markers: dict[str, list[tuple[float, float]]] | None = None) -> None:
    """Test accuracy (%) against GMACs per image, one line per label (curves of a single point are left out), and
    ``markers``: labelled points without a line, drawn on top (settings measured at some reductions only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if len(points) > 1:
            axis.plot(*zip(*points, strict=True), marker="o", label=label)
    for label, points in (markers or {}).items():
        if points:
            axis.plot(*zip(*points, strict=True), linestyle="none", marker="*", markersize=13, zorder=3, label=label)
    axis.set_xlabel("GMACs per image")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
