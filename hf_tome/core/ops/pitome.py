"""PiToMe's merge rule: protect informative tokens by an energy score, merge only the redundant ones.

Pure tensor code with no knowledge of transformers; written from the description in the project's issue 19
(PiToMe, "Accelerating Transformers with Spectrum-Preserving Token Merging", Tran et al., NeurIPS 2024).

Per layer, on the cosine-similarity graph of the tokens' metric (the head-averaged keys):

1. Every token's energy is the mean over all tokens j of ``f(cos(i, j))`` with the soft threshold
   ``f(x) = x if x > margin else alpha * (exp(x - margin) - 1)``. A token inside a dense cluster of similar tokens
   has a high energy (redundant); an isolated token has a low one (informative).
2. The ``2r`` unprotected tokens of highest energy are the merge candidates. In energy order they alternate
   between set A (1st, 3rd, ...) and set B (2nd, 4th, ...); every A token merges into its most similar B token,
   so exactly ``r`` tokens go, as in ToMe's bipartite step (token counts, batching and the FLOPs accounting hold).
3. Every other token, the low-energy ones, stays as it is.

The step is returned as a :class:`~hf_tome.core.ops.pruning.PruneMerge` with nothing pruned: the output is the
protected prefix followed by every surviving token (B tokens and untouched ones) in ascending original order.
"""

from __future__ import annotations

import torch

from hf_tome.core.ops.exportable import gather_rows, stable_descending_order, unit_rows
from hf_tome.core.ops.pruning import PruneMerge

PITOME_ALPHA = 1.0
"""Scale of the soft threshold below the margin (the ELU-like branch of the energy)."""

PITOME_MARGIN = 0.9
"""The margin of the first layer; it falls linearly to 0 at the last (see :func:`pitome_margin`)."""


def pitome_margin(layer: int, num_layers: int) -> float:
    """The energy margin of layer ``layer`` (0-based) of ``num_layers``: ``0.9 - 0.9 * layer / num_layers``, >= 0.

    Deeper layers hold more similar tokens, so a lower margin counts more of their neighbours as one cluster.
    """
    return max(0.0, PITOME_MARGIN - PITOME_MARGIN * layer / max(num_layers, 1))


def energy_scores(metric: torch.Tensor, margin: float, alpha: float = PITOME_ALPHA) -> torch.Tensor:
    """Energy [B, N] (float32) of every token of ``metric`` [B, N, D]: mean over all j of f(cos(i, j)).

    ``f(x) = x`` above ``margin``, ``alpha * (exp(x - margin) - 1)`` (in (-alpha, 0]) at or below it.
    """
    # float32: in bfloat16 near-ties flip and the ranking of energies becomes noisy.
    return _energy(unit_rows(metric), margin, alpha)


def _energy(unit: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
    """:func:`energy_scores` of an already normalised float32 metric."""
    similarity = unit @ unit.transpose(1, 2)
    soft = torch.where(similarity > margin, similarity, alpha * ((similarity - margin).exp() - 1))
    return soft.mean(dim=-1)


def pitome_matching(metric: torch.Tensor, r: int, protected: int = 1, margin: float = PITOME_MARGIN,
                    alpha: float = PITOME_ALPHA) -> PruneMerge:
    """Merge the ``r`` most redundant tokens of ``metric`` [B, N, D] by PiToMe's rule (see the module docstring).

    ``r`` must already be clamped to ``(N - protected) // 2`` (the same bound as ToMe's, so ``2r`` candidates
    exist). The protected prefix ``[0, protected)`` is never a candidate: it keeps its slots and absorbs nothing.
    Runs without gradients: only applying the result (``merge_weighted``) is differentiable.
    """
    batch, num_tokens, _ = metric.shape
    if r < 0 or r > (num_tokens - protected) // 2:
        raise ValueError(f"r={r} is out of range: expected 0 <= r <= (N - protected) // 2 = "
                         f"{(num_tokens - protected) // 2} for N={num_tokens}, protected={protected}")
    device = metric.device
    with torch.no_grad():
        unit = unit_rows(metric)
        energy = _energy(unit, margin, alpha)
        # Protected tokens sort last, so they are never among the 2r candidates (2r <= N - protected).
        energy[:, :protected] = -torch.inf
        # A stable order keeps one image's choice independent of the rest of the batch when energies tie, and
        # (unlike argsort(stable=True)) exports to ONNX.
        order = stable_descending_order(energy)
        candidates, rest = order[:, : 2 * r], order[:, 2 * r:]
        set_a, set_b = candidates[:, 0::2], candidates[:, 1::2]
        scores = gather_rows(unit, set_a) @ gather_rows(unit, set_b).transpose(1, 2)
        destination = set_b.gather(1, scores.argmax(dim=-1))  # input index of each A token's partner
        # Survivors in ascending original order; the protected prefix (indices 0..protected-1) comes first.
        kept = torch.cat([set_b, rest], dim=1).sort(dim=1).values
        slots = torch.arange(num_tokens - r, device=device).expand(batch, -1)
        slot_of = torch.zeros(batch, num_tokens, dtype=torch.long, device=device).scatter(1, kept, slots)
        merged_into = slot_of.gather(1, destination)
        nothing = torch.zeros(batch, 0, dtype=torch.long, device=device)
    return PruneMerge(protected, kept, set_a, merged_into, nothing, nothing)
