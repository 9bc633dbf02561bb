"""What ``hf-tome compress`` can be asked (``CompressOptions``) and its command-line options, without importing
torch (``hf-tome --help`` builds every subcommand's parser)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


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
