"""Evaluating image classifiers on a labelled ``datasets`` split: accuracy (through ``evaluate``) and images/s.

Shared by the main job (``hf-tome bench``), the default-model builder and the search, so every number in the
README is produced by the same loop: preprocess with the model's own image processor, run the forward pass
under ``inference_mode``, time only the forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_tome.evaluation.metrics import load_metric


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """Turn ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"`` into a torch dtype.

    ``"auto"`` picks bfloat16 where the hardware runs it natively (CUDA with bf16, or a CPU whose oneDNN
    reports bf16 support such as avx512_bf16/AMX: about twice the fp32 speed there) and float32 otherwise.
    """
    if isinstance(name, torch.dtype):
        return name
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    if name not in choices:
        raise ValueError(f"dtype={name!r} is invalid: expected 'auto' or one of {', '.join(choices)}")
    return choices[name]


def pixel_batches(dataset, image_processor, batch_size: int, image_column: str = "image",
                  label_column: str | None = "label") -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(pixel_values, labels)`` batches, preprocessing each batch with ``image_processor``.

    ``label_column`` None reads unlabeled images (labels are then None).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected a positive integer")
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        images = [image.convert("RGB") for image in rows[image_column]]
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        yield pixel_values, torch.as_tensor(rows[label_column]) if label_column is not None else None


@dataclass
class ClassificationResult:
    """Accuracy of a classifier on a split and the speed of its forward passes."""

    accuracy: float
    images_per_s: float
    num_images: int
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "images_per_s": self.images_per_s, "num_images": self.num_images,
                "seconds": self.seconds}


def preprocess_all(dataset, image_processor, batch_size: int, dtype: torch.dtype,
                   description: str = "preprocessing") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch of :func:`pixel_batches`, preprocessed once and kept in memory in ``dtype``.

    A sweep evaluates the same images several times; preprocessing them once saves a pass of the image
    processor per setting (10,000 Fashion-MNIST images at 224 px take about 3 GB in bfloat16).
    """
    batches = []
    with tqdm(total=len(dataset), desc=description, unit="img") as progress:
        for pixel_values, labels in pixel_batches(dataset, image_processor, batch_size):
            batches.append((pixel_values.to(dtype), labels))
            progress.update(len(labels))
    return batches


def evaluate_classifier(model: nn.Module, dataset, image_processor, batch_size: int = 64,
                        dtype: torch.dtype = torch.float32, description: str = "evaluating",
                        batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> ClassificationResult:
    """Top-1 accuracy of ``model`` on ``dataset`` (``image`` and ``label`` columns) and its images/s.

    The model runs in ``dtype`` for the call and is put back to its previous dtype afterwards. Only the
    forward passes are timed; the first batch doubles as warm-up and is not timed. ``batches`` (from
    :func:`preprocess_all`) replaces preprocessing ``dataset`` again.
    """
    metric = load_metric("accuracy")
    device = next(model.parameters()).device
    previous_dtype = next(model.parameters()).dtype
    model.eval().to(dtype)
    forward_seconds, timed_images = 0.0, 0
    try:
        with torch.inference_mode(), tqdm(total=len(dataset), desc=description, unit="img") as progress:
            source = batches if batches is not None else pixel_batches(dataset, image_processor, batch_size)
            for index, (pixel_values, labels) in enumerate(source):
                pixel_values = pixel_values.to(device=device, dtype=dtype)
                start = time.perf_counter()
                logits = model(pixel_values=pixel_values).logits
                elapsed = time.perf_counter() - start
                if index > 0 or len(dataset) <= batch_size:
                    forward_seconds += elapsed
                    timed_images += len(labels)
                metric.add_batch(predictions=logits.argmax(-1).cpu(), references=labels)
                progress.update(len(labels))
    finally:
        model.to(previous_dtype)
    accuracy = float(metric.compute()["accuracy"])
    return ClassificationResult(accuracy, timed_images / max(forward_seconds, 1e-9), len(dataset), forward_seconds)


def pooled_features(backbone: nn.Module, dataset, image_processor, batch_size: int = 64,
                    dtype: torch.dtype = torch.float32, description: str = "features") -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """The ``[class token, mean of patch tokens]`` features a ``Dinov2ForImageClassification`` head reads.

    Returns ``(features [N, 2 * hidden] float32, labels [N])``. Works for unpatched backbones only (the
    mean here is the plain one the stock head takes).
    """
    features, labels = [], []
    previous_dtype = next(backbone.parameters()).dtype
    backbone.eval().to(dtype)
    try:
        with torch.inference_mode(), tqdm(total=len(dataset), desc=description, unit="img") as progress:
            for pixel_values, batch_labels in pixel_batches(dataset, image_processor, batch_size):
                hidden = backbone(pixel_values=pixel_values.to(dtype)).last_hidden_state.float()
                num_prefix = 1 + getattr(backbone.config, "num_register_tokens", 0)
                features.append(torch.cat([hidden[:, 0], hidden[:, num_prefix:].mean(dim=1)], dim=1))
                labels.append(batch_labels)
                progress.update(len(batch_labels))
    finally:
        backbone.to(previous_dtype)
    return torch.cat(features), torch.cat(labels)


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
                    steps: int = 200) -> nn.Linear:
    """Multinomial logistic regression on frozen features (full-batch L-BFGS), returned as an ``nn.Linear``.

    Features are standardised for a well-conditioned optimisation; the scaling is folded back into the
    layer, so it reads the raw features exactly like the stock classifier head.
    """
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    standardised = (features - mean) / std
    head = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(standardised), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    folded = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - (head.weight * mean / std).sum(dim=1))
    return folded
