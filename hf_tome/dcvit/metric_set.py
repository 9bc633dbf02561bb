"""A metric set without external data (DC-ViT): images optimised from noise until a model predicts chosen labels.

Loss per step: cross-entropy to the chosen labels + ``l2_weight * ||x||^2`` + ``tv_weight * total variation``,
on a randomly jittered (rolled) and flipped copy of the images, so the result does not hinge on exact pixels.
Pure PyTorch: the model is any callable mapping pixel values to logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class MetricSet:
    """Synthetic images, the labels they were optimised towards, and the loss after every step."""

    pixel_values: torch.Tensor
    labels: torch.Tensor
    losses: list[float] = field(default_factory=list)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (both directions), per image summed over channels."""
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(-2, -1)).sum(-1)
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(-2, -1)).sum(-1)
    return (vertical + horizontal).mean()


def _jitter_and_flip(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    shifts = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    images = torch.roll(images, shifts=shifts, dims=(-2, -1))
    return images.flip(-1) if torch.rand((), generator=generator).item() < 0.5 else images


def generate_metric_set(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    num_images: int,
    num_labels: int,
    image_shape: tuple[int, int, int],
    steps: int = 100,
    lr: float = 0.1,
    l2_weight: float = 1e-5,
    tv_weight: float = 1e-4,
    max_shift: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> MetricSet:
    """Optimise ``num_images`` Gaussian-noise images (labels cycling through ``num_labels``) with Adam.

    ``logits_fn`` maps ``[B, *image_shape]`` pixel values to ``[B, num_labels]`` logits; its parameters are not
    updated (only the pixels are). Returns the images (detached), their labels and the loss of every step.
    """
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, *image_shape, generator=generator).to(device).requires_grad_(True)
    labels = (torch.arange(num_images) % num_labels).to(device)
    optimizer = torch.optim.Adam([images], lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc="metric set", disable=not progress):
        logits = logits_fn(_jitter_and_flip(images, max_shift, generator))
        loss = (F.cross_entropy(logits.float(), labels) + l2_weight * images.pow(2).sum(dim=(1, 2, 3)).mean()
                + tv_weight * total_variation(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return MetricSet(images.detach(), labels, losses)
