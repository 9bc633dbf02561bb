"""The options of the ``hf-tome`` subcommands, defined without importing torch or transformers.

``hf-tome --help`` builds every subcommand's parser, so their definitions live here, in a module that imports
only the standard library and :mod:`hf_tome.config`. The code that runs them imports torch and friends at the
top: :mod:`hf_tome.search` and :mod:`hf_tome.compress` (which re-export ``SearchOptions``/``CompressOptions`` and
``add_search_arguments``/``add_compress_arguments`` from here) and :mod:`server.app` (``add_serve_arguments``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from .config import MERGE_MATCHES


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that writes a default as it is typed (a list as ``0.7 0.55``) and leaves
    out flags (``False``) and ``None`` defaults: an option whose default is ``None`` says in its help what
    happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if ("%(default)" in help_text or default is argparse.SUPPRESS or default is None or isinstance(default, bool)
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return help_text
        shown = " ".join(str(item) for item in default) if isinstance(default, list | tuple) else str(default)
        return f"{help_text} (default: {shown.replace('%', '%%')})"  # the help is %-formatted afterwards


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
    """The options of ``hf-tome search`` (shared with ``python -m hf_tome.search``)."""
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


@dataclass
class CompressOptions:
    """What ``hf-tome compress`` was asked to do (see ``hf-tome compress --help``)."""

    target: float = 0.75
    model: str | None = None
    method: str = "dc-vit"
    data: str = "fashion-mnist"
    split: str = "train"
    num_images: int = 500
    image_column: str = "image"
    out: Path = Path("results/compress")
    resume: bool = False
    epochs_per_block: float = 2.0
    final_epochs: float = 0.0
    trial_epochs: float = 0.25
    batch_size: int = 16
    lr: float = 3e-5
    metric_images: int = 32
    metric_steps: int = 40
    importance: str = "activation"
    mixed_precision: str | None = None
    seed: int = 0
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_limit: int | None = 1000
    push_to_hub: str | None = None


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hf-tome compress`` (shared with ``python -m hf_tome.compress``)."""
    defaults = CompressOptions()
    parser.add_argument("--target", type=float, default=defaults.target,
                        help="MACs target: a fraction (<= 1) of the full model or GMACs per image (> 1)")
    parser.add_argument("--model", default=None, help="local folder or Hub id of a ViT, DeiT or Dinov2 model "
                        "(default: the embedded DINOv2-S Fashion-MNIST model)")
    parser.add_argument("--method", choices=["dc-vit", "drop"], default=defaults.method,
                        help="dc-vit (dense) or drop (whole blocks, the baseline)")
    parser.add_argument("--data", default=defaults.data, help="unlabeled images: 'fashion-mnist', a folder of "
                        "image files, a Dataset.save_to_disk folder or a Hub dataset id")
    parser.add_argument("--split", default=defaults.split, help="split of --data the images are drawn from")
    parser.add_argument("--num-images", type=int, default=defaults.num_images, help="unlabeled images used (50-1000)")
    parser.add_argument("--image-column", default=defaults.image_column, help="column of --data holding the images")
    parser.add_argument("--out", type=Path, default=defaults.out, help="output folder (model/, state/, compress.json)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/state")
    parser.add_argument("--epochs-per-block", type=float, default=defaults.epochs_per_block,
                        help="feature-mimicking epochs on the unlabeled images after each compressed block")
    parser.add_argument("--final-epochs", type=float, default=defaults.final_epochs,
                        help="more feature mimicking once every block is compressed (all of them trainable)")
    parser.add_argument("--trial-epochs", type=float, default=defaults.trial_epochs,
                        help="feature-mimicking epochs of each block's trial compression (which blocks to compress)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per fine-tuning step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate of the fine-tuning")
    parser.add_argument("--metric-images", type=int, default=defaults.metric_images,
                        help="synthetic images (generated from noise) that score the block trials of a classifier")
    parser.add_argument("--metric-steps", type=int, default=defaults.metric_steps,
                        help="optimisation steps that generate the synthetic images")
    parser.add_argument("--importance", choices=["activation", "first"], default=defaults.importance,
                        help="which MLP units survive: most active x largest output weights, or simply the first")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                        help="default: whatever `accelerate launch` / `accelerate config` says")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the image draw, the synthetic images and the fine-tuning")
    parser.add_argument("--eval-dataset", default=None, help="labelled dataset to measure accuracy and images/s "
                        "for the model card ('fashion-mnist', a save_to_disk folder or a Hub id)")
    parser.add_argument("--eval-split", default=defaults.eval_split, help="split of --eval-dataset")
    parser.add_argument("--eval-limit", type=int, default=defaults.eval_limit,
                        help="evaluate only the first N images of --eval-dataset")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the model with its card")


# ``server.app.ServerOptions`` holds these defaults too; it lives in a module that imports litserve and torch, so
# they are written out here and tests/test_cli.py checks that both agree.
SERVE_BUDGETS = ("full=r:0", "half=macs:0.5")  # server.budgets.DEFAULT_BUDGET_SPECS
SERVE_MAX_BODY_BYTES = 10 * 1024 * 1024  # server.guard.Limits.max_body_bytes
SERVE_MAX_PIXELS = 16_000_000  # server.guard.Limits.max_pixels


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hf-tome serve`` (shared with ``python -m server``)."""
    parser.add_argument("--model", default=None, help="local folder or Hub id (default: the embedded default model)")
    # append to None, not to a list default: argparse would add the given budgets to the default ones
    parser.add_argument("--budget", dest="budgets", action="append", default=None,
                        help="name=spec, repeatable; spec is r:<int>[,<inflect>] or macs:<fraction>; the first is "
                             f"the default budget (default: {' '.join(SERVE_BUDGETS)})")
    parser.add_argument("--max-batch-size", type=int, default=16, help="largest dynamic batch; 1 turns batching off")
    parser.add_argument("--batch-timeout", type=float, default=0.05, help="seconds to wait to fill a batch")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                        help="dtype of the model; auto: bfloat16 where the CPU/GPU runs it natively")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the inference worker; also keeps "
                        "the server on the CPU (default: torch's choice, and a GPU where there is one)")
    parser.add_argument("--max-body-bytes", type=int, default=SERVE_MAX_BODY_BYTES,
                        help="larger request bodies are answered 413")
    parser.add_argument("--max-pixels", type=int, default=SERVE_MAX_PIXELS,
                        help="larger images (width x height) are answered 413")
