"""How much a batched forward pass gains per image over batch 1, which bounds what server batching can gain.

Embedded default model (or ``--model``), unpatched, 224 px, median of timed runs per batch size, float32 and
bfloat16. If batch 16 runs only ``x`` times the images/s of batch 1, a server that batches requests can serve at
most ``x`` times the requests/s of one that does not, plus what it saves of per-request overhead.

    python benchmarks/batch_efficiency.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import hf_tome
from hf_tome.evaluation.reporting import machine_info


def images_per_s(model: torch.nn.Module, batch_size: int, dtype: torch.dtype, images: int) -> float:
    pixels = torch.randn(batch_size, 3, 224, 224, dtype=dtype)
    with torch.inference_mode():
        model(pixel_values=pixels)  # warm-up
        times = []
        for _ in range(max(3, images // batch_size)):
            start = time.perf_counter()
            model(pixel_values=pixels)
            times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--images", type=int, default=48, help="images timed per batch size (at least 3 runs)")
    parser.add_argument("--out", type=Path, default=Path("results/batch_efficiency.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from hf_tome.evaluation.assets.default_model import default_model_path

        args.model = str(default_model_path())
    model = hf_tome.remove(hf_tome.AutoModelForImageClassification.from_pretrained(args.model).eval())
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        model.to(dtype)
        speeds = {size: images_per_s(model, size, dtype, args.images) for size in args.batch_sizes}
        rows.append({"dtype": str(dtype).removeprefix("torch."), "images_per_s": speeds,
                     "largest_over_batch1": speeds[max(speeds)] / speeds[min(speeds)]})
    print("| dtype | " + " | ".join(f"batch {size} img/s" for size in args.batch_sizes) + " | gain |")
    print("|---" * (len(args.batch_sizes) + 2) + "|")
    for row in rows:
        print(f"| {row['dtype']} | " + " | ".join(f"{v:.2f}" for v in row["images_per_s"].values())
              + f" | {row['largest_over_batch1']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "threads": args.threads, "machine": machine_info()}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
