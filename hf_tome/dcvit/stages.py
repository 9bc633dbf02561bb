"""A ViT, DeiT or Dinov2 model cut in stages, so fine-tuning can start from cached hidden states.

``embed`` (patch embedding), ``run_blocks`` (encoder blocks ``start..stop-1``), ``final_tokens`` (the last norm:
``last_hidden_state``) and ``logits_from_tokens`` (the classification head on those tokens) together give the
same outputs as the stock forward. ``SuffixStudent`` runs blocks ``start..`` and the final norm on a hidden state
entering block ``start``: what the fine-tuning trains, with the frozen prefix computed once per pool entry.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_tome.dcvit.blocks import encoder_layers


def embed(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch embedding (class, distillation, register tokens and positions included) of ``model``'s base model."""
    base = model.base_model
    weight = base.embeddings.patch_embeddings.projection.weight
    return base.embeddings(pixel_values.to(weight.dtype))


def run_blocks(model: nn.Module, hidden: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    """Encoder blocks ``start..stop-1`` (to the end when ``stop`` is None) on ``hidden``."""
    for layer in list(encoder_layers(model))[start:stop]:
        output = layer(hidden)  # no attention mask: every version of the stock layers takes this call
        hidden = output[0] if isinstance(output, tuple) else output
    return hidden


def final_tokens(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The base model's final norm: the output tokens (``last_hidden_state``)."""
    return model.base_model.layernorm(hidden)


def has_head(model: nn.Module) -> bool:
    """True for the image classifiers whose head ``logits_from_tokens`` knows."""
    return isinstance(getattr(model, "classifier", None), nn.Linear)


def logits_from_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The class logits ``model``'s head computes from its output tokens (ViT, DeiT: the class token; Dinov2: the
    class token and the mean of the patch tokens, registers left out)."""
    if not has_head(model):
        raise ValueError(f"{type(model).__name__} has no linear classification head: expected an "
                         "*ForImageClassification model")
    if type(model.base_model).__name__.startswith("Dinov2"):
        registers = getattr(model.config, "num_register_tokens", 0) or 0
        return model.classifier(torch.cat([tokens[:, 0], tokens[:, 1 + registers:].mean(dim=1)], dim=1))
    return model.classifier(tokens[:, 0])


class SuffixStudent(nn.Module):
    """Blocks ``start..`` and the final norm of ``model`` (what is trained; DDP wraps this module).

    ``forward(hidden)`` takes the hidden state entering block ``start`` and returns the output tokens, and the
    logits too when ``with_logits``.
    """

    def __init__(self, model: nn.Module, start: int, with_logits: bool = False) -> None:
        super().__init__()
        self.model = model
        self.start = start
        self.with_logits = with_logits

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = final_tokens(self.model, run_blocks(self.model, hidden, self.start))
        return tokens, logits_from_tokens(self.model, tokens) if self.with_logits else None


@torch.no_grad()
def prefix_hidden(model: nn.Module, pixel_values: torch.Tensor, start: int) -> torch.Tensor:
    """The hidden state entering block ``start`` (patch embedding, then blocks ``0..start-1``), without gradients."""
    return run_blocks(model, embed(model, pixel_values), 0, start)
