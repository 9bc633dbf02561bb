"""What ``hf-tome search`` can be asked (``SearchOptions``) and its command-line options, without importing torch
(``hf-tome --help`` builds every subcommand's parser)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from hf_tome.config import MERGE_MATCHES, MERGE_MODES, MERGE_RULES

STRATEGIES = ("halving", "staged")
"""Schedules of the random search (``SearchOptions.strategy``); see :func:`resolve_schedule`."""


@dataclass
class SearchOptions:
    """What ``hf-tome search`` was asked to do (see ``hf-tome search --help``)."""

    model: str | None = None
    dataset: str = "fashion-mnist"
    split: str = "train"
    targets: list[float] = field(default_factory=lambda: [0.7, 0.55])
    method: str = "random"
    strategy: str = "halving"
    candidates: int | None = None
    search_images: int = 1024
    val_images: int = 1000
    stage_images: list[int] | None = None
    keep: float | None = None
    eta: float = 3.0
    min_images: int = 12
    finalists: int = 2
    protect_block_0: bool = False
    tome_seeds: list[float] = field(default_factory=lambda: [0.0, -0.5, 0.5])
    tome_decays: list[float] = field(default_factory=lambda: [0.8, 0.85, 0.9])
    tome_first_steps: list[int] | None = None
    shaped: float = 0.75
    merge_matches: list[str] = field(default_factory=lambda: list(MERGE_MATCHES))
    merge_rule: str | None = None
    merge_mode: str | None = None
    prune_matched_layers: int | None = None
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
    keep_freed_memory: bool = True


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
    parser.add_argument("--strategy", choices=list(STRATEGIES), default=defaults.strategy,
                        help="random search: 'halving' (successive halving: many candidates on --min-images images, "
                        "the best 1/--eta of each bucket go on to --eta times more images, up to --search-images; "
                        "sized to about 20 minutes for DINOv2-S on 2 CPU cores) or 'staged' (the earlier search: "
                        "10,000 candidates, stages of 64 / 256 / 1,024 images keeping 10%%; hours on a CPU)")
    parser.add_argument("--candidates", type=int, default=defaults.candidates,
                        help="random candidates in all, spread evenly over the targets (default: halving, enough "
                        "to halve down to --finalists per target over its stages; staged, 10000); the run time "
                        "grows with it, and the search prints its estimate before it starts")
    parser.add_argument("--search-images", type=int, default=defaults.search_images,
                        help="images of --split the candidates are ranked on")
    parser.add_argument("--val-images", type=int, default=defaults.val_images,
                        help="held-out images of --split that score the chosen rows")
    parser.add_argument("--stage-images", type=int, nargs="+", default=defaults.stage_images,
                        help="images per evaluation stage (growing); the last stage picks each bucket's best "
                        "(default: halving, --search-images divided by powers of --eta down to --min-images; "
                        "staged, 64 256 1024)")
    parser.add_argument("--keep", type=float, default=defaults.keep, help="fraction of each bucket kept per stage "
                        "(default: halving, 1/--eta; staged, 0.1)")
    parser.add_argument("--eta", type=float, default=defaults.eta, help="successive halving: each stage keeps "
                        "1/eta of a bucket and runs it on eta times more images")
    parser.add_argument("--min-images", type=int, default=defaults.min_images,
                        help="successive halving: the fewest images of the first stage")
    parser.add_argument("--finalists", type=int, default=defaults.finalists, help="successive halving: random "
                        "candidates per target left for the last stage (with the ToMe seeds)")
    parser.add_argument("--protect-block-0", action="store_true", help="never compress block 0 (the spec's rule; "
                        "it costs accuracy on DINOv2-S): candidates, and ToMe seeds, leave it alone")
    parser.add_argument("--tome-seeds", type=float, nargs="*", default=defaults.tome_seeds, metavar="INFLECT",
                        help="add ToMe's own schedule (bipartite merging, block 0 included) at every target for "
                        "each inflect (0: constant r); they join the last stage, so the chosen row is at least as "
                        "good as the best of them on the search images. Give the option alone for none")
    parser.add_argument("--tome-decays", type=float, nargs="*", default=defaults.tome_decays, metavar="DECAY",
                        help="also seed the last stage with ToMe's matching on a geometrically decaying schedule "
                        "(layer i merges about scale * DECAY**i tokens, scale fitted to each target), one per decay "
                        "in (0, 1]. Give the option alone for none")
    parser.add_argument("--tome-first-steps", type=int, nargs="*", default=None, metavar="TOKENS",
                        help="also seed, for every --tome-decays value, the decaying schedule whose first compressible "
                        "layer merges TOKENS tokens (the other layers fitted to each target); default: none")
    parser.add_argument("--shaped", type=float, default=defaults.shaped, help="fraction of the random candidates "
                        "drawn with ToMe-like shapes and small prune shares (the rest: any non-increasing profile)")
    parser.add_argument("--merge-matches", nargs="+", choices=list(MERGE_MATCHES), default=defaults.merge_matches,
                        help="merge rules the random candidates take in turn: class_attention (merge the tokens "
                        "ranked below merge_kept into their most similar kept token) and/or bipartite (ToMe's "
                        "matching on the survivors of pruning); each row stores the rule it won with. Random "
                        "search only: --method diffrate relaxes the class-attention rule")
    parser.add_argument("--merge-rule", choices=list(MERGE_RULES), default=None, help="how every candidate picks the "
                        "tokens of its bipartite merges (ToMeConfig.merge_rule; default: the model's saved setting, "
                        "else bipartite); saved with the table")
    parser.add_argument("--merge-mode", choices=list(MERGE_MODES), default=None, help="how every candidate combines "
                        "merged tokens: mean (ToMe) or mlerp (norm-preserving; ToMeConfig.merge_mode; default: the "
                        "model's saved setting, else mean); saved with the table")
    parser.add_argument("--prune-matched-layers", type=int, default=None, help="layers, from the first, in which "
                        "every candidate prunes its matched tokens instead of merging them (ToFu; "
                        "ToMeConfig.prune_matched_layers; default: the model's saved setting, else 0); saved with "
                        "the table")
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
    parser.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                        help="leave glibc malloc's thresholds alone (hf_tome.keep_freed_memory): the candidates' "
                             "forwards then fault in fresh pages, slower on a CPU")
    parser.add_argument("--diffrate-steps", type=int, default=defaults.diffrate_steps,
                        help="gradient steps of the differentiable search, per target")
    parser.add_argument("--diffrate-batch", type=int, default=defaults.diffrate_batch,
                        help="images per step of the differentiable search")
    parser.add_argument("--diffrate-lr", type=float, default=defaults.diffrate_lr,
                        help="learning rate of the differentiable search")
    parser.add_argument("--flops-weight", type=float, default=defaults.flops_weight,
                        help="lambda of the FLOPs penalty of the differentiable search")


def resolve_schedule(options: SearchOptions, num_targets: int) -> tuple[list[int], float, int]:
    """The stages' image counts, the fraction kept per stage and the random candidates in all for ``options``
    (what ``--stage-images``, ``--keep`` and ``--candidates`` say, else the strategy's defaults).

    ``"halving"``: stages of ``search_images / eta**k`` images (rounded, the last all of them, the first at least
    ``min_images``), keeping ``1 / eta``, with ``finalists * eta**(stages - 1)`` candidates per target (rounded
    up), so each bucket halves down to ``finalists`` for the last stage. ``"staged"``: the earlier defaults,
    64 / 256 / 1,024 images, keeping 10% of 10,000 candidates.
    """
    if options.strategy not in STRATEGIES:
        raise ValueError(f"strategy={options.strategy!r} is invalid: expected one of {list(STRATEGIES)}")
    if options.strategy == "staged":
        stages = options.stage_images or [64, 256, 1024]
        keep = options.keep if options.keep is not None else 0.1
        candidates = options.candidates or 10_000
    else:
        if options.eta <= 1 or options.min_images < 1 or options.finalists < 1:
            raise ValueError(f"eta={options.eta}, min_images={options.min_images}, finalists={options.finalists} "
                             "are invalid: expected eta > 1, min_images >= 1 and finalists >= 1")
        stages = options.stage_images or halving_stages(options.search_images, options.min_images, options.eta)
        keep = options.keep if options.keep is not None else 1 / options.eta
        per_target = math.ceil(options.finalists / keep ** (len(stages) - 1) - 1e-9)
        candidates = options.candidates or per_target * num_targets
    stages = sorted({min(count, options.search_images) for count in stages})
    bad_decays = [decay for decay in options.tome_decays if not 0 < decay <= 1]
    if bad_decays:
        raise ValueError(f"tome_decays={bad_decays} are invalid: expected factors in (0, 1]")
    first_steps = options.tome_first_steps or []
    bad_steps = [step for step in first_steps if isinstance(step, bool) or not isinstance(step, int) or step < 0]
    if bad_steps or (first_steps and not options.tome_decays):
        raise ValueError(f"tome_first_steps={list(first_steps)} is invalid: expected token counts >= 0, with at "
                         "least one of tome_decays")
    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep} is invalid: expected a fraction in (0, 1]")
    return stages, keep, candidates


def halving_stages(search_images: int, min_images: int, eta: float) -> list[int]:
    """``search_images / eta**k`` for k = ..., 1, 0 (rounded), from the smallest count still >= ``min_images``."""
    stages = [search_images]
    while round(stages[0] / eta) >= min_images and round(stages[0] / eta) < stages[0]:
        stages.insert(0, round(stages[0] / eta))
    return stages
