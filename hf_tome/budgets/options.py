"""What ``hf-tome search`` can be asked (``SearchOptions``) and its command-line options, without importing torch
(``hf-tome --help`` builds every subcommand's parser)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from hf_tome.config import MERGE_MATCHES


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


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hf-tome search`` (shared with ``python -m hf_tome.budgets.search``)."""
    defaults = SearchOptions()
    parser.add_argument("--model", default=None, help="local folder or Hub id of an image classifier (default: the "
                        "embedded DINOv2-S Fashion-MNIST model)")
    parser.add_argument("--dataset", default=defaults.dataset, help="'fashion-mnist', a Dataset.save_to_disk folder "
                        "or a Hub dataset id, with 'image' and 'label' columns")
    parser.add_argument("--split", default=defaults.split, help="labelled split, cut into search and validation "
                        "images")
    parser.add_argument("--targets", type=float, nargs="+", default=defaults.targets,
                        help="FLOPs targets: fractions (<= 1) of the full model's MACs or GFLOPs (> 1)")
    parser.add_argument("--method", choices=["random", "diffrate"], default=defaults.method,
                        help="random: staged evaluation of random candidates; diffrate: differentiable search")
    parser.add_argument("--candidates", type=int, default=defaults.candidates,
                        help="random candidates in all, spread evenly over the targets; the run time grows with "
                        "it, and the search prints its estimate before it starts")
    parser.add_argument("--search-images", type=int, default=defaults.search_images,
                        help="images of --split the candidates are ranked on")
    parser.add_argument("--val-images", type=int, default=defaults.val_images,
                        help="held-out images of --split that score the chosen rows")
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
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per forward pass")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 where the CPU/GPU runs it natively, else float32")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the image shuffle, the candidates and the differentiable search")
    parser.add_argument("--out", type=Path, default=defaults.out, help="folder for search.json and search.png")
    parser.add_argument("--save-model", type=Path, default=None, help="where to save the model with its budget "
                        "table (default: <out>/model)")
    parser.add_argument("--in-place", action="store_true", help="also write the table into --model's config.json")
    parser.add_argument("--no-baseline", action="store_true", help="skip constant-r ToMe on the validation images")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is available")
    parser.add_argument("--diffrate-steps", type=int, default=defaults.diffrate_steps,
                        help="gradient steps of the differentiable search, per target")
    parser.add_argument("--diffrate-batch", type=int, default=defaults.diffrate_batch,
                        help="images per step of the differentiable search")
    parser.add_argument("--diffrate-lr", type=float, default=defaults.diffrate_lr,
                        help="learning rate of the differentiable search")
    parser.add_argument("--flops-weight", type=float, default=defaults.flops_weight,
                        help="lambda of the FLOPs penalty of the differentiable search")
