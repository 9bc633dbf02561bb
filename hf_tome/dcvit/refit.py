"""Least-squares refit of a compressed block's MLP output layer (our addition to DC-ViT, ``--init least-squares``).

A compressed block computes ``x + s * fc2(h)`` with ``h = act(fc1(norm2(x)))`` the kept hidden units (``s`` the
per-channel layer scale, 1 without one). The published rule keeps ``fc2``'s trained columns for those units, but
they were trained to add the MLP's share of the block's update, not the attention's too. Given the hidden states
entering the block in the student (``x``) and leaving the same block in the original model (``y``), the best
``fc2`` for the kept units is a linear least-squares problem: ``fc2(h) ~ (y - x) / s`` over every token of a few
images. Solving it (ridge-regularised, in float64, from accumulated normal equations so memory does not grow with
the images) replaces thousands of fine-tuning steps: on the embedded DINOv2-S at 75% of the MACs the four
compressed blocks go from 16.0% to 75.7% test accuracy before any fine-tuning (README, "DC-ViT").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from hf_tome.dcvit.blocks import encoder_layers, has_attention, mlp_output_scale, mlp_width
from hf_tome.dcvit.stages import embed, run_blocks

INITS = ("least-squares", "published")
DEFAULT_RIDGE = 1e-4


@dataclass(frozen=True)
class RefitResult:
    """Mean squared error of the block's output against the original's, over the fitting tokens."""

    block: int
    mse_before: float
    mse_after: float
    tokens: int

    @property
    def kept(self) -> bool:
        """True when the fit was applied (it is only applied when it lowers the error)."""
        return self.mse_after <= self.mse_before


@torch.no_grad()
def refit_block(student: nn.Module, original: nn.Module, block: int, pixel_values: torch.Tensor,
                accelerator: Accelerator | None = None, batch_size: int = 32, ridge: float = DEFAULT_RIDGE,
                description: str | None = None) -> RefitResult:
    """Refit ``fc2`` (weights and bias) of ``student``'s compressed ``block`` so that it maps the student's hidden
    states entering the block to ``original``'s hidden states leaving it, over every token of ``pixel_values``.

    ``ridge`` is relative to the mean diagonal of the normal equations. The new weights are kept only when they
    lower the block's error on the same tokens (else the block is left as it was). A block without attention and
    with at least one MLP unit is expected; ``ValueError`` otherwise.
    """
    layer = encoder_layers(student)[block]
    if has_attention(layer) or mlp_width(layer) == 0:
        raise ValueError(f"block {block} is not a compressed block with MLP units: expected a block whose attention "
                         "was removed and that kept at least one MLP unit")
    fc2 = layer.mlp.fc2
    scale = mlp_output_scale(layer)
    device = fc2.weight.device
    columns = fc2.in_features + (fc2.bias is not None)  # a constant column fits the bias
    gram = torch.zeros(columns, columns, dtype=torch.float64, device=device)
    moment = torch.zeros(columns, fc2.out_features, dtype=torch.float64, device=device)
    captured: list[torch.Tensor] = []
    handle = fc2.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    pairs = []  # (student input, original output) per batch, for the error before and after
    was_training = (student.training, original.training)
    student.eval()
    original.eval()
    try:
        for start in tqdm(range(0, len(pixel_values), batch_size), desc=description, disable=description is None):
            images = pixel_values[start:start + batch_size].to(device)
            with accelerator.autocast() if accelerator is not None else torch.autocast(device.type, enabled=False):
                entering = run_blocks(student, embed(student, images), 0, block)
                leaving = run_blocks(original, embed(original, images), 0, block + 1)
                captured.clear()
                run_blocks(student, entering, block, block + 1)
            hidden = captured[0].flatten(0, -2).double()
            features = hidden if fc2.bias is None else torch.cat([hidden, hidden.new_ones(len(hidden), 1)], dim=1)
            target = (leaving - entering).flatten(0, -2).double()
            if scale is not None:
                target = target / scale.double()
            gram += features.T @ features
            moment += features.T @ target
            pairs.append((entering.float().cpu(), leaving.float().cpu()))
    finally:
        handle.remove()
    tokens = sum(len(entering.flatten(0, -2)) for entering, _ in pairs)
    before = _block_error(student, block, pairs, device)  # in float32, like the error after: comparable
    old_weight, old_bias = fc2.weight.detach().clone(), None if fc2.bias is None else fc2.bias.detach().clone()
    damping = ridge * gram.diagonal().mean().clamp_min(1e-12)
    solution = torch.linalg.solve(gram + damping * torch.eye(columns, dtype=gram.dtype, device=device), moment)
    fc2.weight.copy_(solution[:fc2.in_features].T.to(fc2.weight.dtype))
    if fc2.bias is not None:
        fc2.bias.copy_(solution[-1].to(fc2.bias.dtype))
    after = _block_error(student, block, pairs, device)
    if after > before:
        fc2.weight.copy_(old_weight)
        if old_bias is not None:
            fc2.bias.copy_(old_bias)
    student.train(was_training[0])
    original.train(was_training[1])
    return RefitResult(block=block, mse_before=before, mse_after=after, tokens=tokens)


def _block_error(student: nn.Module, block: int, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> float:
    """Mean squared error of ``student``'s ``block`` output (float32) against the original's, over ``pairs``."""
    dtype = next(student.parameters()).dtype
    total, count = 0.0, 0
    for entering, leaving in pairs:
        output = run_blocks(student, entering.to(device=device, dtype=dtype), block, block + 1).float().cpu()
        total += (output - leaving).pow(2).sum().item()
        count += leaving.numel()
    return total / max(count, 1)
