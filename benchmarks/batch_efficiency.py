"""Bare forward images/s per budget and batch size: what a server batching requests can at best reach.

Embedded default model (or ``--model``) at its image processor's input size, on ``--device`` (auto: CUDA when torch
sees a GPU), median of timed runs per batch size. Each budget (``--budget name=spec``, the server's syntax and
defaults) runs exactly as ``hf-tome serve`` runs it: the model patched once, each forward given the budget's plan
as ``model(pixel_values=..., tome_plan=plan)``, on ready tensors (no decoding or preprocessing). If batch 16 runs
only ``x`` times the images/s of batch 1, a server that batches requests can serve at most ``x`` times the
requests/s of one that does not; benchmarks/load_test.py compares the server's images/s with these numbers.

    python benchmarks/batch_efficiency.py --threads 2
    python benchmarks/batch_efficiency.py --device cuda --dtypes bfloat16 float16 --batch-sizes 1 16 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from allocator_option import add_allocator_option, apply_allocator_option

import hf_tome
from hf_tome.evaluation.reporting import machine_info

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGETS = ("full=r:0", "half=macs:0.5")  # hf_tome_server.budgets.DEFAULT_BUDGET_SPECS


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(model: torch.nn.Module, pixels: torch.Tensor, images: int, plan=None) -> float:
    """Images/s of ``model(pixel_values=pixels, tome_plan=plan)``: the median of at least 3 timed runs."""
    kwargs = {} if plan is None else {"tome_plan": plan}
    with torch.inference_mode():
        for _ in range(2):  # warm-up: a fresh process's first forwards build kernels and allocate
            model(pixel_values=pixels, **kwargs)
        times = []
        for _ in range(max(3, images // pixels.shape[0])):
            _synchronize(pixels.device)
            start = time.perf_counter()
            model(pixel_values=pixels, **kwargs)
            _synchronize(pixels.device)
            times.append(time.perf_counter() - start)
    return pixels.shape[0] / statistics.median(times)


def measure(model_path: str, budget_specs: list[str], batch_sizes: list[int], dtypes: list[str], device: str,
            images: int) -> list[dict]:
    """One row per dtype and budget: images/s at each batch size."""
    from hf_tome_server.budgets import parse_budgets
    from PIL import Image
    from transformers import AutoImageProcessor

    from hf_tome.evaluation.classification import resolve_dtype

    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    model = hf_tome.AutoModelForImageClassification.from_pretrained(model_path).eval()
    processor = AutoImageProcessor.from_pretrained(model_path)
    probe = processor(images=Image.new("RGB", (64, 64)), return_tensors="pt")["pixel_values"]
    budgets = parse_budgets(model, budget_specs, tuple(probe.shape[-2:]))
    hf_tome.apply(model, next(iter(budgets.values())).config)  # as the server: patched once, plans per forward
    rows = []
    for dtype_name in dtypes:
        dtype = resolve_dtype(dtype_name, device)
        model.to(device=device, dtype=dtype)
        for budget in budgets.values():
            speeds = {}
            for size in batch_sizes:
                pixels = torch.randn(size, *probe.shape[1:], generator=torch.Generator().manual_seed(0))
                speeds[size] = images_per_s(model, pixels.to(device, dtype), images, budget.plan)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "budget": budget.name, "spec": budget.spec,
                         "gmacs": round(budget.gmacs, 4), "device": str(device), "images_per_s": speeds,
                         "largest_over_batch1": speeds[max(speeds)] / speeds[min(speeds)]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_allocator_option(parser, "the server's default is to set them, as here")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--images", type=int, default=48, help="images timed per batch size (at least 3 runs)")
    parser.add_argument("--budget", dest="budgets", action="append", default=None,
                        help=f"name=spec as for hf-tome serve, repeatable (default: {' '.join(DEFAULT_BUDGETS)})")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/batch_efficiency.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = apply_allocator_option(args)
    if args.model is None:
        from hf_tome.evaluation.assets.default_model import default_model_path

        args.model = str(default_model_path())
    rows = measure(args.model, args.budgets or list(DEFAULT_BUDGETS), args.batch_sizes, args.dtypes, args.device,
                   args.images)
    print("| dtype | budget | " + " | ".join(f"batch {size} img/s" for size in args.batch_sizes) + " | gain |")
    print("|---" * (len(args.batch_sizes) + 3) + "|")
    for row in rows:
        print(f"| {row['dtype']} | {row['budget']} | " + " | ".join(f"{v:.2f}" for v in row["images_per_s"].values())
              + f" | {row['largest_over_batch1']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "keep_freed_memory": kept, "threads": torch.get_num_threads(),
                                    "device": rows[0]["device"], "machine": machine_info()}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
