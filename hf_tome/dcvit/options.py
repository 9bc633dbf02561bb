"""What ``hf-tome compress`` can be asked (``CompressOptions``) and its command-line options, without importing
torch (``hf-tome --help`` builds every subcommand's parser)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from hf_tome.dcvit.recipe import (
    DEFAULT_FINAL_ITERATIONS,
    DEFAULT_POOL_COPIES,
    DEFAULT_TRIAL_ITERATIONS,
    RECIPE_AUGMENT,
    RECIPE_BATCH_SIZE,
    RECIPE_ITERATIONS_PER_BLOCK,
    RECIPE_LR,
    RECIPE_WEIGHT_DECAY,
)


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
    iterations_per_block: int = RECIPE_ITERATIONS_PER_BLOCK
    final_iterations: int = DEFAULT_FINAL_ITERATIONS
    trial_iterations: int = DEFAULT_TRIAL_ITERATIONS
    epochs_per_block: float | None = None  # deprecated aliases: epochs of the images, turned into iterations
    final_epochs: float | None = None
    trial_epochs: float | None = None
    budget_minutes: float | None = None
    batch_size: int = RECIPE_BATCH_SIZE
    micro_batch_size: int | None = None
    lr: float = RECIPE_LR
    weight_decay: float = RECIPE_WEIGHT_DECAY
    warmup_iterations: int | None = None
    augment: str = RECIPE_AUGMENT
    pool_copies: int = DEFAULT_POOL_COPIES
    train_scope: str = "prefix"
    trial_scope: str = "local"
    logits_weight: float = 0.0
    cache_dtype: str = "float32"
    metric_images: int = 32
    metric_steps: int = 40
    importance: str = "activation"
    init: str = "least-squares"
    mixed_precision: str | None = None
    seed: int = 0
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_limit: int | None = 1000
    push_to_hub: str | None = None


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hf-tome compress`` (shared with ``python -m hf_tome.dcvit.compress``)."""
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
    parser.add_argument("--iterations-per-block", type=int, default=defaults.iterations_per_block,
                        help="feature-mimicking steps after each compressed block (the published recipe's)")
    parser.add_argument("--final-iterations", type=int, default=defaults.final_iterations,
                        help="more feature-mimicking steps once every block is compressed (all of them trainable)")
    parser.add_argument("--trial-iterations", type=int, default=defaults.trial_iterations,
                        help="feature-mimicking steps of each block's trial compression (which blocks to compress)")
    for name, replaces in (("epochs-per-block", "iterations-per-block"), ("final-epochs", "final-iterations"),
                           ("trial-epochs", "trial-iterations")):
        parser.add_argument(f"--{name}", type=float, default=None, help=f"deprecated alias of --{replaces}: "
                            "epochs of the unlabeled images, turned into iterations (round(epochs x images / batch))")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="measure a step at start and scale every phase's iterations to fit this many minutes "
                        "(default: no budget, the iterations as given)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="images per fine-tuning step, over all devices")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="images per forward pass, the gradients "
                        "accumulated up to --batch-size (default: the whole batch at once)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of the fine-tuning")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help="AdamW weight decay of the weight matrices (none on biases and norms)")
    parser.add_argument("--warmup-iterations", type=int, default=None, help="linear learning-rate warm-up steps of "
                        "each phase (default: the recipe's 20 epochs of the images, at most 10%% of a phase)")
    parser.add_argument("--augment", choices=["color-jitter", "none"], default=defaults.augment,
                        help="augmentation of the pool copies: colour jitter and horizontal flip, or none")
    parser.add_argument("--pool-copies", type=int, default=defaults.pool_copies,
                        help="versions of every image (the first unchanged) whose teacher outputs are computed once")
    parser.add_argument("--train-scope", choices=["prefix", "local"], default=defaults.train_scope,
                        help="blocks trained after each compressed block: every block up to one past the deepest "
                        "compressed one (prefix, the spec) or only the new block and the next (local, faster)")
    parser.add_argument("--trial-scope", choices=["prefix", "local"], default=defaults.trial_scope,
                        help="blocks trained in each block trial (see --train-scope)")
    parser.add_argument("--logits-weight", type=float, default=defaults.logits_weight,
                        help="weight of a KL term on the class predictions added to the token MSE (0: tokens only)")
    parser.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default=defaults.cache_dtype,
                        help="dtype of the cached teacher outputs and frozen-prefix states (bfloat16: half the memory)")
    parser.add_argument("--metric-images", type=int, default=defaults.metric_images,
                        help="synthetic images (generated from noise) that score the block trials of a classifier")
    parser.add_argument("--metric-steps", type=int, default=defaults.metric_steps,
                        help="optimisation steps that generate the synthetic images")
    parser.add_argument("--importance", choices=["activation", "first"], default=defaults.importance,
                        help="which MLP units survive: most active x largest output weights, or simply the first")
    parser.add_argument("--init", choices=["least-squares", "published"], default=defaults.init,
                        help="a compressed block's MLP output layer: refit by least squares to the original block's "
                        "output on the unlabeled images (ours, measured better), or the kept units' trained weights "
                        "(the published rule)")
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
