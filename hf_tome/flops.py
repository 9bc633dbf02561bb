"""MACs accounting for ViT-style encoders, per layer, with and without token reduction.

One block with C channels, MLP width I, N tokens entering and N' after its reduction costs
``4*N*C^2 + 2*N^2*C`` (attention at N) plus ``2*N'*C*I`` (MLP at N'; ``8*N'*C^2`` for the usual I = 4C).
Patch embedding adds ``N_patches * C * channels * p^2`` and the classifier ``C * num_classes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from .adapters.registry import EncoderShape, find_adapter
from .blocks import compression_of
from .schedule import kept_tokens_per_layer, tokens_per_layer


@dataclass
class ComputeReport:
    """Token counts and MACs of every layer of one model at one input size (per image)."""

    tokens_in: list[int]
    tokens_out: list[int]
    layer_macs: list[int]
    embedding_macs: int
    head_macs: int

    @property
    def total_macs(self) -> int:
        return self.embedding_macs + sum(self.layer_macs) + self.head_macs

    @property
    def gmacs(self) -> float:
        return self.total_macs / 1e9

    def to_dict(self) -> dict:
        return {**asdict(self), "total_macs": self.total_macs, "gmacs": self.gmacs}


def block_macs(hidden_size: int, intermediate_size: int, tokens_in: int, tokens_out: int,
               attention: bool = True) -> int:
    """MACs of one block: attention on ``tokens_in`` tokens (none when removed), MLP on ``tokens_out``."""
    attention_macs = 4 * tokens_in * hidden_size**2 + 2 * tokens_in**2 * hidden_size if attention else 0
    return attention_macs + 2 * tokens_out * hidden_size * intermediate_size


def encoder_report(shape: EncoderShape, tokens_after: Sequence[int],
                   compressed_layers: dict[int, int] | None = None) -> ComputeReport:
    """Report for an encoder whose layer ``i`` reduces its input to ``tokens_after[i]`` tokens.

    ``compressed_layers`` maps the blocks that lost their attention (DC-ViT) to their kept MLP units.
    """
    compressed_layers = compressed_layers or {}
    tokens_in = [shape.num_patches + shape.protected, *tokens_after[:-1]]
    layer_macs = [
        block_macs(shape.hidden_size, compressed_layers.get(index, shape.intermediate_size), n_in, n_out,
                   attention=index not in compressed_layers)
        for index, (n_in, n_out) in enumerate(zip(tokens_in, tokens_after, strict=True))
    ]
    return ComputeReport(tokens_in, list(tokens_after), layer_macs, shape.num_patches * shape.patch_macs_per_patch,
                         shape.head_macs)


def compute_report(model: nn.Module, image_size: tuple[int, int] | None = None) -> ComputeReport:
    """Tokens entering each layer and the MACs per image of ``model`` as currently configured.

    Works on patched and unpatched models (unpatched: no reduction). ``image_size`` (height, width) defaults
    to the config's.
    """
    adapter = find_adapter(model)
    if adapter.compute_report is not None:  # e.g. windowed attention, which the formula above does not describe
        return adapter.compute_report(model, image_size)
    shape = adapter.encoder_shape(model, image_size)
    plan = getattr(adapter.loop_module(model), "_tome_plan", None)
    num_tokens = shape.num_patches + shape.protected
    if plan is not None and getattr(plan, "prune_kept", None) is not None:
        counts = kept_tokens_per_layer(num_tokens, plan.prune_kept, plan.merge_kept)
    else:
        schedule = plan.layer_r if plan is not None else [0] * shape.num_layers
        counts = tokens_per_layer(num_tokens, schedule, shape.protected)
    return encoder_report(shape, counts[1:], compression_of(model))
