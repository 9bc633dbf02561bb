"""A fixed pool of augmented copies of the unlabeled images, with the teacher's outputs computed once.

The teacher (the original model) is frozen, so its output tokens for a given augmented image never change: the pool
draws ``copies`` versions of every image once (copy 0 is the image as given, the others get a random colour jitter
and horizontal flip, as in the published recipe), and the teacher runs once per entry instead of once per training
step. An entry is stored as its image index and jitter factors; its pixels are rebuilt on demand (cheap,
elementwise), so only the teacher's outputs take memory (``entries x tokens x channels``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from hf_tome.dcvit.stages import embed, final_tokens, has_head, logits_from_tokens, run_blocks

AUGMENTATIONS = ("color-jitter", "none")
COLOR_JITTER = 0.4  # brightness, contrast and saturation factors drawn from [1 - 0.4, 1 + 0.4] (torchvision's style)
_LUMA = (0.299, 0.587, 0.114)


def color_jitter(images: torch.Tensor, factors: torch.Tensor, flips: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation (``factors`` [B, 3]) and horizontal flips (``flips`` [B]) applied to
    normalised ``images`` [B, 3, H, W] in pixel space ([0, 1], un-normalised with ``mean``/``std``, then again)."""
    mean, std = mean.view(1, 3, 1, 1).to(images), std.view(1, 3, 1, 1).to(images)
    luma = torch.tensor(_LUMA).view(1, 3, 1, 1).to(images)
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1).to(images) for i in range(3))
    x = (images * std + mean).clamp(0, 1)
    x = (x * brightness).clamp(0, 1)
    grey_mean = (x * luma).sum(1, keepdim=True).mean(dim=(-2, -1), keepdim=True)
    x = ((x - grey_mean) * contrast + grey_mean).clamp(0, 1)
    grey = (x * luma).sum(1, keepdim=True)
    x = ((x - grey) * saturation + grey).clamp(0, 1)
    x = torch.where(flips.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    return (x - mean) / std


@dataclass
class AugmentedPool:
    """``len(pool)`` entries: image ``image_index[i]`` with jitter ``factors[i]`` and ``flips[i]`` (entries with
    ``augmented[i]`` False are the image as given), and, once cached, the teacher's outputs for every entry."""

    pixels: torch.Tensor
    image_index: torch.Tensor
    factors: torch.Tensor
    flips: torch.Tensor
    augmented: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    teacher_tokens: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.image_index)

    def images(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The (augmented) pixel values of the entries ``indices`` (all when None), on the pixels' device."""
        indices = torch.arange(len(self)) if indices is None else indices.cpu()
        raw = self.pixels[self.image_index[indices]]
        augmented = self.augmented[indices]
        if not augmented.any():
            return raw
        jittered = color_jitter(raw, self.factors[indices], self.flips[indices], self.mean, self.std)
        return torch.where(augmented.view(-1, 1, 1, 1), jittered, raw)

    def plain_teacher_tokens(self) -> torch.Tensor:
        """The cached teacher tokens of the images as given (the first copy of every image), float32 on the CPU."""
        return self.teacher_tokens[: len(self.pixels)].float().cpu()


def build_pool(pixels: torch.Tensor, copies: int = 1, augment: str = "color-jitter", seed: int = 0,
               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> AugmentedPool:
    """``copies`` entries per image (``copies x len(pixels)`` in all): copy 0 of every image as given, the others
    augmented with ``augment`` (``"color-jitter"``: colour jitter and a random horizontal flip; ``"none"``: all
    copies unchanged). The same ``seed`` gives the same pool."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r} is invalid: expected one of {', '.join(AUGMENTATIONS)}")
    if copies < 1:
        raise ValueError(f"copies={copies} is invalid: expected at least 1")
    count = len(pixels)
    generator = torch.Generator().manual_seed(seed)
    size = copies * count
    factors = 1 + COLOR_JITTER * (2 * torch.rand(size, 3, generator=generator) - 1)
    flips = torch.rand(size, generator=generator) < 0.5
    augmented = (torch.arange(size) >= count) & (augment != "none")
    factors[~augmented], flips[~augmented] = 1.0, False
    return AugmentedPool(pixels=pixels, image_index=torch.arange(size) % count, factors=factors, flips=flips,
                         augmented=augmented, mean=torch.tensor(mean or IMAGENET_DEFAULT_MEAN, dtype=torch.float),
                         std=torch.tensor(std or IMAGENET_DEFAULT_STD, dtype=torch.float))


def _batched(pool: AugmentedPool, compute: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
             device: torch.device, batch_size: int, autocast, description: str | None, dtype: torch.dtype):
    chunks: list[list[torch.Tensor]] = []
    for start in tqdm(range(0, len(pool), batch_size), desc=description, disable=description is None):
        indices = torch.arange(start, min(start + batch_size, len(pool)))
        with autocast():
            outputs = compute(pool.images(indices).to(device))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        chunks.append([output.to(dtype) for output in outputs])
    return [torch.cat(parts) for parts in zip(*chunks, strict=True)]


def _context(accelerator: Accelerator | None):
    return accelerator.autocast if accelerator is not None else contextlib.nullcontext


@torch.no_grad()
def cache_teacher(pool: AugmentedPool, teacher: nn.Module, accelerator: Accelerator | None = None,
                  batch_size: int = 32, logits: bool = False, dtype: torch.dtype = torch.float32,
                  description: str | None = "teacher outputs") -> AugmentedPool:
    """Run the frozen ``teacher`` once over every pool entry and keep its output tokens (and logits) on the
    accelerator's device, in ``dtype``; returns ``pool``."""
    device = accelerator.device if accelerator is not None else next(teacher.parameters()).device
    teacher.eval()

    def compute(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = final_tokens(teacher, run_blocks(teacher, embed(teacher, images), 0))
        return (tokens, logits_from_tokens(teacher, tokens).float()) if logits else (tokens,)

    if logits and not has_head(teacher):
        raise ValueError("logit mimicking needs a classifier: the model has no linear classification head")
    outputs = _batched(pool, compute, device, batch_size, _context(accelerator), description, dtype)
    pool.teacher_tokens = outputs[0]
    pool.teacher_logits = outputs[1].float() if logits else None
    return pool


@torch.no_grad()
def cache_prefix(pool: AugmentedPool, student: nn.Module, start: int, accelerator: Accelerator | None = None,
                 batch_size: int = 32, dtype: torch.dtype = torch.float32,
                 description: str | None = None) -> torch.Tensor:
    """The hidden state entering block ``start`` of ``student`` for every pool entry (its frozen prefix: patch
    embedding and blocks ``0..start-1``, in eval mode), on the accelerator's device."""
    device = accelerator.device if accelerator is not None else next(student.parameters()).device
    was_training = student.training
    student.eval()
    try:
        (hidden,) = _batched(pool, lambda images: run_blocks(student, embed(student, images), 0, start), device,
                             batch_size, _context(accelerator), description, dtype)
    finally:
        student.train(was_training)
    return hidden
