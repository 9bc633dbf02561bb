"""Drawing merged token groups on the input image (each group filled with its mean colour, outlined)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from hf_tome.integration.patch import apply, tome_config_of


def group_labels(source: torch.Tensor, protected: int, grid: tuple[int, int]) -> np.ndarray:
    """For one sample's source matrix [N_now, N_orig], the group index of every patch as a [rows, cols] array."""
    patch_source = source[protected:, protected:]
    if patch_source.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"source covers {patch_source.shape[1]} patches but the grid {grid} has {grid[0] * grid[1]}")
    return patch_source.argmax(dim=0).reshape(grid).cpu().numpy()


def draw_groups(image: Image.Image, labels: np.ndarray, outline: tuple[int, int, int] = (20, 20, 20)) -> Image.Image:
    """Fill every group of patches with its mean colour and outline group borders."""
    rows, cols = labels.shape
    patch = max(1, 448 // max(rows, cols))
    pixels = np.asarray(image.convert("RGB").resize((cols * patch, rows * patch), Image.BICUBIC), dtype=np.float32)
    pixel_labels = np.kron(labels, np.ones((patch, patch), dtype=labels.dtype))
    canvas = np.empty_like(pixels)
    for group in np.unique(labels):
        inside = pixel_labels == group
        canvas[inside] = pixels[inside].mean(axis=0)
    # A pixel is on a border when its right or lower neighbour belongs to another group.
    border = np.zeros(pixel_labels.shape, dtype=bool)
    border[:, :-1] |= pixel_labels[:, :-1] != pixel_labels[:, 1:]
    border[:-1, :] |= pixel_labels[:-1, :] != pixel_labels[1:, :]
    canvas[border] = outline
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def visualize_merges(model: nn.Module, image: Image.Image, image_processor, protected: int | None = None
                     ) -> Image.Image:
    """Run ``model`` (patched with hf_tome) on ``image`` with source tracking and draw the merged groups.

    The model's own settings are restored afterwards.
    """
    from hf_tome.integration.registry import find_adapter

    config = tome_config_of(model)
    if config is None:
        raise ValueError("visualize_merges needs a model patched with hf_tome.apply (got an unpatched model)")
    adapter = find_adapter(model)
    protected = adapter.protected_tokens(model.config) if protected is None else protected
    inputs = image_processor(images=image.convert("RGB"), return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(next(model.parameters()).device)
    apply(model, config.replace(trace_source=True))
    try:
        with torch.no_grad():
            output = model.base_model(pixel_values)
    finally:
        apply(model, config)
    patch = model.config.patch_size
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    return draw_groups(image, group_labels(output.token_source[0], protected, grid))
