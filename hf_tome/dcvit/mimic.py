"""Feature-mimicking fine-tuning (DC-ViT): a compressed student learns the original model's output tokens.

Loss: MSE between all output tokens (``last_hidden_state``) of the student and of the original model (optionally
plus a KL term on the class predictions), on a pool of augmented copies of a few unlabeled images whose teacher
outputs were computed once (:mod:`hf_tome.dcvit.pool`). Only the blocks up to one past the deepest compressed block
are updated (from block 0, or from the shallowest compressed block with the ``"local"`` scope); the frozen prefix
runs once per pool entry, not every step. AdamW with a linear warm-up and a cosine schedule. Runs through an
``accelerate.Accelerator`` (mixed precision, several devices, gradient accumulation).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from hf_tome.dcvit.blocks import encoder_layers
from hf_tome.dcvit.pool import AugmentedPool, build_pool, cache_prefix
from hf_tome.dcvit.recipe import RECIPE_LR, RECIPE_WEIGHT_DECAY, epochs_to_iterations
from hf_tome.dcvit.stages import SuffixStudent

SCOPES = ("prefix", "local")


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


def set_trainable_blocks(model: nn.Module, last_block: int, first_block: int = 0) -> list[nn.Parameter]:
    """Freeze everything but blocks ``first_block..last_block``; returns the trainable parameters."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = []
    for layer in list(encoder_layers(model))[first_block: last_block + 1]:
        for parameter in layer.parameters():
            parameter.requires_grad_(True)
            trainable.append(parameter)
    return trainable


def trainable_range(compressed_blocks: Sequence[int], num_layers: int, scope: str = "prefix") -> tuple[int, int]:
    """(first, last) trainable block: up to one past the deepest compressed block, from block 0 (``"prefix"``, the
    spec) or from the shallowest compressed block (``"local"``: the blocks before it are frozen and cached)."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is invalid: expected one of {', '.join(SCOPES)}")
    last = min(max(compressed_blocks) + 1, num_layers - 1)
    return (0 if scope == "prefix" else min(compressed_blocks)), last


def make_optimizer(parameters: Sequence[nn.Parameter], lr: float = RECIPE_LR,
                   weight_decay: float = RECIPE_WEIGHT_DECAY) -> torch.optim.AdamW:
    """AdamW with ``weight_decay`` on the weight matrices (group 0) and none on biases, norms and scales
    (group 1)."""
    decay = [parameter for parameter in parameters if parameter.ndim >= 2]
    no_decay = [parameter for parameter in parameters if parameter.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def make_schedule(optimizer: torch.optim.Optimizer, warmup: int, iterations: int):
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``iterations``."""
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=iterations)


def mimic_loss(tokens: torch.Tensor, teacher_tokens: torch.Tensor, logits: torch.Tensor | None = None,
               teacher_logits: torch.Tensor | None = None, logits_weight: float = 0.0) -> torch.Tensor:
    """MSE between all output tokens, plus ``logits_weight`` x KL(teacher || student) of the class predictions."""
    loss = F.mse_loss(tokens.float(), teacher_tokens.float())
    if logits_weight:
        loss = loss + logits_weight * F.kl_div(logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1),
                                               log_target=True, reduction="batchmean")
    return loss


def batch_loss(student: nn.Module, pool: AugmentedPool, hidden: torch.Tensor, indices: torch.Tensor,
               logits_weight: float = 0.0) -> torch.Tensor:
    """Mimicking loss of ``student`` (a prepared ``SuffixStudent``) on pool entries ``indices``, from their cached
    hidden states ``hidden`` and the cached teacher outputs."""
    device = hidden.device
    tokens, logits = student(hidden[indices.to(device)])
    teacher_logits = pool.teacher_logits[indices.to(pool.teacher_logits.device)] if logits_weight else None
    return mimic_loss(tokens, pool.teacher_tokens[indices.to(pool.teacher_tokens.device)].to(tokens.device), logits,
                      None if teacher_logits is None else teacher_logits.to(tokens.device), logits_weight)


def _batches(size: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of pool indices (whole passes, the last partial batch dropped)."""
    batch_size = min(batch_size, size)
    while True:
        order = torch.randperm(size, generator=generator)
        for start in range(0, size - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


Checkpoint = Callable[[int, nn.Module], None]
"""``on_checkpoint(step, model)`` of :func:`finetune_mimic`: called with the steps done and the model in eval mode."""


def checkpoint_steps(iterations: int, points: int) -> list[int]:
    """``points`` evenly spaced steps (1-based) of a phase of ``iterations``, the last one its end; fewer when the
    phase is shorter than ``points``, none when either is 0."""
    if iterations <= 0 or points <= 0:
        return []
    return sorted({math.ceil(iterations * k / points) for k in range(1, points + 1)})


def finetune_mimic(model: nn.Module, pixel_values: torch.Tensor | AugmentedPool, teacher_tokens: torch.Tensor | None,
                   compressed_blocks: Sequence[int], accelerator: Accelerator, epochs: float | None = None,
                   batch_size: int = 16, lr: float = RECIPE_LR, weight_decay: float = RECIPE_WEIGHT_DECAY,
                   seed: int = 0, description: str = "fine-tuning", *, iterations: int | None = None,
                   warmup: int = 0, scope: str = "prefix", micro_batch_size: int | None = None,
                   logits_weight: float = 0.0, cache_dtype: torch.dtype = torch.float32,
                   timings: list[float] | None = None, on_checkpoint: Checkpoint | None = None,
                   checkpoints: int = 0) -> list[float]:
    """Fine-tune ``model`` in place to mimic the teacher; returns the loss of every step.

    ``pixel_values`` is an ``AugmentedPool`` with cached teacher outputs (``teacher_tokens`` None), or images with
    their ``teacher_tokens`` (a pool of the images as given). Trains the blocks of ``trainable_range`` for
    ``iterations`` steps (or ``epochs`` passes over the pool; one pass when neither is given) of ``batch_size``
    entries, split across the accelerator's processes and, by gradient accumulation, into ``micro_batch_size``
    pieces. The frozen patch embedding and blocks before the first trainable one run once per pool entry
    (``cache_prefix``), not every step. AdamW (``make_optimizer``), linear warm-up then cosine. ``timings`` gets
    every step's seconds.

    ``on_checkpoint(step, model)`` runs after each of the ``checkpoint_steps(iterations, checkpoints)`` steps, on
    the main process (the others wait), with ``model`` in eval mode; training resumes afterwards as if it had not
    been called, so it must not change ``model`` (copy it to run it in another dtype or on another device). It is
    not timed in ``timings``.
    """
    pool = pixel_values if isinstance(pixel_values, AugmentedPool) else build_pool(pixel_values, augment="none")
    if teacher_tokens is not None:
        pool.teacher_tokens = teacher_tokens
    if iterations is None:
        iterations = epochs_to_iterations(1.0 if epochs is None else epochs, len(pool), batch_size)
    if iterations <= 0:  # nothing to train (e.g. block trials scored right after the init): skip the caches too
        model.eval()
        return []
    num_layers = len(encoder_layers(model))
    first, last = trainable_range(compressed_blocks, num_layers, scope)
    trainable = set_trainable_blocks(model, last, first)
    hidden = cache_prefix(pool, model, first, accelerator, dtype=cache_dtype)
    optimizer = make_optimizer(trainable, lr, weight_decay)
    scheduler = make_schedule(optimizer, warmup, iterations)  # stepped once per global batch: not prepared
    student, optimizer = accelerator.prepare(SuffixStudent(model, first, with_logits=bool(logits_weight)), optimizer)
    student.train()
    batches = _batches(len(pool), batch_size, torch.Generator().manual_seed(seed))
    rank, world = accelerator.process_index, accelerator.num_processes
    losses: list[float] = []
    at = set(checkpoint_steps(iterations, checkpoints)) if on_checkpoint is not None else set()
    for step in tqdm(range(1, iterations + 1), desc=description, disable=not accelerator.is_local_main_process):
        started = time.perf_counter()
        local = next(batches)[rank::world]
        pieces = local.split(micro_batch_size or len(local))
        total = torch.zeros((), device=accelerator.device)
        for number, piece in enumerate(pieces):
            last_piece = number == len(pieces) - 1
            with contextlib.nullcontext() if last_piece else accelerator.no_sync(student):
                loss = batch_loss(student, pool, hidden, piece, logits_weight) * (len(piece) / len(local))
                accelerator.backward(loss)
            total += loss.detach()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.gather(total[None]).mean().item())
        if timings is not None:
            timings.append(time.perf_counter() - started)
        if step in at:
            model.eval()
            if accelerator.is_main_process:
                on_checkpoint(step, model)
            accelerator.wait_for_everyone()
            student.train()
    del hidden
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
