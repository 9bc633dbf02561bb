"""MACs of ViT-style encoders as pure functions of their sizes: no model, no transformers.

One block with C channels, MLP width I, N tokens entering and N' after its reduction costs
``4*N*C^2 + 2*N^2*C`` (attention at N) plus ``2*N'*C*I`` (MLP at N'; ``8*N'*C^2`` for the usual I = 4C).
Patch embedding adds ``N_patches * C * channels * p^2`` and the classifier ``C * num_classes``.
``hf_tome.integration.flops.compute_report`` reads the sizes off a model; adapters with their own formula (Swin)
build on
:class:`ComputeReport` from here, below the adapters in the import order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EncoderShape:
    """Sizes the FLOPs formula needs, for one model at one input size."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_patches: int
    protected: int
    patch_macs_per_patch: int  # MACs of embedding one patch (channels * patch area * hidden)
    head_macs: int  # MACs of the classifier(s) on top, 0 for a bare backbone


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


def nearest_r(macs_of_r: Callable[[int], float], target_macs: float, max_r: int, side: str = "at_most") -> int | None:
    """The r of a schedule family nearest ``target_macs``, given its MACs as a function of r (non-increasing in r).

    ``side="at_most"``: the smallest r in ``0..max_r`` with ``macs_of_r(r) <= target_macs`` (None when none is);
    ``"at_least"``: the largest r with ``macs_of_r(r) >= target_macs`` (None when even r=0 is below it).
    A relative tolerance of 1e-9 counts a target met exactly as met.
    """
    if side not in ("at_most", "at_least"):
        raise ValueError(f"side={side!r} is invalid: expected 'at_most' or 'at_least'")
    tolerance = abs(target_macs) * 1e-9
    if side == "at_most":
        return next((r for r in range(max_r + 1) if macs_of_r(r) <= target_macs + tolerance), None)
    reaching = [r for r in range(max_r + 1) if macs_of_r(r) >= target_macs - tolerance]
    return max(reaching) if reaching else None
