"""Throughput of token merging against the unpatched model, measured in the same run (ratios, not seconds).

Random weights of the real architectures (speed does not depend on weights). Every setting is timed in
round-robin rounds so that slow drift of the machine hits all settings alike; the median round is reported.

    python benchmarks/throughput.py                       # ViT-B/16, 224 px, batch 32, fp32
    python benchmarks/throughput.py --batch 8 --rounds 2  # quicker
    python benchmarks/throughput.py --families AST VideoMAE-B --family-batch 4   # other families' rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers as T
from allocator_option import add_allocator_option, apply_allocator_option
from tqdm import tqdm

import hf_tome

# name -> ToMeConfig keyword arguments; None is the unpatched model.
VIT_SETTINGS: dict[str, dict | None] = {
    "unpatched": None,
    "r=8": {"r": 8},
    "r=13": {"r": 13},
    "r=16": {"r": 16},
    "r=(16,-1)": {"r": 16, "inflect": -1.0},
}


def vit_base(image_size: int = 224) -> torch.nn.Module:
    """ViT-B/16 classifier (1000 classes) with random weights."""
    config = T.ViTConfig(image_size=image_size, num_labels=1000)
    return T.ViTForImageClassification(config).eval()


def _time_batch(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(inputs)
    return time.perf_counter() - start


def measure(model: torch.nn.Module, inputs: torch.Tensor, settings: dict[str, dict | None], rounds: int,
            warmup: int = 1) -> dict[str, dict]:
    """Images/s and MACs of every setting; settings are applied to the same model instance in turn."""
    configs = {name: (hf_tome.ToMeConfig(**kwargs) if kwargs is not None else None)
               for name, kwargs in settings.items()}
    timings: dict[str, list[float]] = {name: [] for name in settings}
    macs: dict[str, float] = {}
    # Images and videos end in (height, width); audio adapters take their sizes from the config.
    image_size = tuple(inputs.shape[-2:]) if inputs.ndim in (4, 5) else None
    for name, config in configs.items():
        _configure(model, config)
        macs[name] = hf_tome.compute_report(model, image_size).gmacs
        for _ in range(warmup):
            _time_batch(model, inputs)
    for _ in tqdm(range(rounds), desc="rounds"):
        for name, config in configs.items():
            _configure(model, config)
            timings[name].append(_time_batch(model, inputs))
    baseline = statistics.median(timings[next(iter(settings))])
    batch = inputs.shape[0]
    return {
        name: {
            "images_per_s": batch / statistics.median(times),
            "speedup": baseline / statistics.median(times),
            "gmacs": macs[name],
            "macs_reduction": macs[next(iter(settings))] / macs[name],
            "seconds_per_batch": times,
        }
        for name, times in timings.items()
    }


def _configure(model: torch.nn.Module, config: hf_tome.ToMeConfig | None) -> None:
    if config is None:
        hf_tome.remove(model)
    else:
        hf_tome.apply(model, config)


def print_table(title: str, results: dict[str, dict]) -> None:
    print(f"\n{title}")
    print("| setting | images/s | speedup | GMACs | MACs reduction |\n|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['images_per_s']:.2f} | {row['speedup']:.2f}x | {row['gmacs']:.2f} | "
              f"{row['macs_reduction']:.2f}x |")


def other_families() -> dict[str, tuple]:
    """Rows of the other model families: ``benchmarks/families_*.py`` each expose ``families()``."""
    import importlib.util

    rows: dict[str, tuple] = {}
    for path in sorted(Path(__file__).parent.glob("families_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rows.update(module.families())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--families", nargs="*", default=None,
                        help="also time these families (names from benchmarks/families_*.py; 'all' for every one)")
    parser.add_argument("--family-batch", type=int, default=4, help="batch size for the other families")
    parser.add_argument("--skip-vit", action="store_true", help="only the --families rows")
    add_allocator_option(parser)
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/throughput.json, "
                        "or throughput_families.json with --skip-vit)")
    args = parser.parse_args()
    if args.out is None:
        args.out = Path("benchmarks/results") / ("throughput_families.json" if args.skip_vit else "throughput.json")
    torch.set_num_threads(args.threads)
    kept_freed_memory = apply_allocator_option(args)
    torch.manual_seed(0)
    report: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                    "torch": torch.__version__, "transformers": T.__version__},
        "keep_freed_memory": kept_freed_memory,
    }
    if not args.skip_vit:
        inputs = torch.randn(args.batch, 3, args.image_size, args.image_size)
        results = measure(vit_base(args.image_size), inputs, VIT_SETTINGS, args.rounds)
        title = f"ViT-B/16 {args.image_size} px, batch {args.batch}, fp32, {args.threads} CPU threads"
        print_table(title, results)
        report["vit_base"] = {"title": title, "results": results}
    if args.families:
        available = other_families()
        names = list(available) if args.families == ["all"] else args.families
        unknown = [name for name in names if name not in available]
        if unknown:
            raise SystemExit(f"unknown famil(ies) {unknown}: expected some of {', '.join(available)}")
        for name in names:
            build, make_inputs, settings = available[name]
            results = measure(build(), make_inputs(args.family_batch), settings, args.rounds)
            title = f"{name}, batch {args.family_batch}, fp32, {args.threads} CPU threads, random weights"
            print_table(title, results)
            report[name] = {"title": title, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
