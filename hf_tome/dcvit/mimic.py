"""Feature-mimicking fine-tuning (DC-ViT): a compressed student learns the original model's output tokens.

Loss: MSE between all output tokens (``last_hidden_state``) of the student and of the original model, on a
few unlabeled images. Only the blocks up to one past the deepest compressed block are updated; AdamW with a
cosine schedule. Runs through an ``accelerate.Accelerator`` (mixed precision, several devices).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from hf_tome.dcvit.blocks import encoder_layers


class OutputTokens(nn.Module):
    """Wraps a model so its forward returns the output tokens of its base model (what DDP wraps and trains)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base = model.base_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.base(pixel_values=pixel_values).last_hidden_state


@torch.inference_mode()
def batched_outputs(model: nn.Module, read: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                    pixel_values: torch.Tensor, batch_size: int = 32, accelerator: Accelerator | None = None,
                    description: str | None = None) -> torch.Tensor:
    """``read(model, batch)`` for every batch of images, in eval mode (and the accelerator's autocast), as float32
    on the CPU, concatenated."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(pixel_values), batch_size), desc=description, disable=description is None):
        batch = pixel_values[start:start + batch_size].to(device)
        with accelerator.autocast() if accelerator is not None else torch.autocast(device.type, enabled=False):
            chunks.append(read(model, batch).float().cpu())
    return torch.cat(chunks)


def output_tokens(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 32,
                  accelerator: Accelerator | None = None, description: str | None = None) -> torch.Tensor:
    """Output tokens [N, T, C] of ``model``'s base model for every image (float32, on the CPU)."""
    return batched_outputs(model, lambda m, batch: m.base_model(pixel_values=batch).last_hidden_state, pixel_values,
                           batch_size, accelerator, description)


def class_log_probs(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 32,
                    accelerator: Accelerator | None = None) -> torch.Tensor:
    """Log-probabilities [N, classes] of ``model``'s class predictions for every image (float32, on the CPU)."""
    return batched_outputs(model, lambda m, batch: m(pixel_values=batch).logits.float().log_softmax(-1),
                           pixel_values, batch_size, accelerator)


def feature_mse(model: nn.Module, pixel_values: torch.Tensor, teacher_tokens: torch.Tensor, batch_size: int = 32,
                accelerator: Accelerator | None = None) -> float:
    """Mean squared error between ``model``'s output tokens and ``teacher_tokens`` over all images."""
    student = output_tokens(model, pixel_values, batch_size, accelerator)
    return F.mse_loss(student, teacher_tokens).item()


def set_trainable_blocks(model: nn.Module, last_block: int) -> list[nn.Parameter]:
    """Freeze everything but blocks ``0..last_block``; returns the trainable parameters."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = []
    for layer in list(encoder_layers(model))[: last_block + 1]:
        for parameter in layer.parameters():
            parameter.requires_grad_(True)
            trainable.append(parameter)
    return trainable


def finetune_mimic(model: nn.Module, pixel_values: torch.Tensor, teacher_tokens: torch.Tensor,
                   compressed_blocks: Sequence[int], accelerator: Accelerator, epochs: float = 1.0,
                   batch_size: int = 16, lr: float = 3e-5, weight_decay: float = 0.05, seed: int = 0,
                   description: str = "fine-tuning") -> list[float]:
    """Fine-tune ``model`` in place to mimic ``teacher_tokens``; returns the loss of every step.

    Trains blocks ``0..max(compressed_blocks) + 1`` for ``epochs`` passes (fractions allowed) over the images,
    batches sharded across the accelerator's processes.
    """
    num_layers = len(encoder_layers(model))
    trainable = set_trainable_blocks(model, min(max(compressed_blocks) + 1, num_layers - 1))
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(pixel_values, teacher_tokens), batch_size=batch_size, shuffle=True,
                        generator=generator, drop_last=len(pixel_values) > batch_size)
    steps = max(1, round(epochs * len(loader)))
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
    student, optimizer, loader, scheduler = accelerator.prepare(OutputTokens(model), optimizer, loader, scheduler)
    student.train()
    losses: list[float] = []
    progress = tqdm(total=steps, desc=description, disable=not accelerator.is_local_main_process)
    while len(losses) < steps:
        for batch_pixels, batch_teacher in loader:
            loss = F.mse_loss(student(batch_pixels).float(), batch_teacher.float())
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.gather(loss.detach()[None]).mean().item())
            progress.update(1)
            progress.set_postfix(mse=f"{losses[-1]:.4f}")
            if len(losses) >= steps:
                break
    progress.close()
    accelerator.free_memory()  # drops the prepared wrappers; ``model`` itself holds the trained weights
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    return losses


def prediction_divergence(model: nn.Module, pixel_values: torch.Tensor, reference_log_probs: torch.Tensor,
                          batch_size: int = 32, accelerator: Accelerator | None = None) -> float:
    """KL(reference || model) of the class predictions, averaged over the images (the block-trial score)."""
    log_probs = class_log_probs(model, pixel_values, batch_size, accelerator)
    return F.kl_div(log_probs, reference_log_probs, log_target=True, reduction="batchmean").item()
