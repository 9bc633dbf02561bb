"""Bipartite soft matching (ToMe): decide which tokens merge into which, from a similarity metric.

Pure tensor code with no knowledge of transformers. Protected tokens (class, distillation, registers) form a
prefix ``[0, protected)`` of the sequence; they never merge away, never absorb another token, and keep their
positions, so heads that read ``hidden[:, 0]`` or ``hidden[:, 1]`` are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_tome.core.ops.exportable import gather_rows, merge_rows, stable_descending_order, unit_rows


@dataclass
class Matching:
    """The outcome of one matching step on a batch; apply it to any per-token tensor with :meth:`merge`.

    Layout of a merged sequence: the protected prefix, then the unmerged tokens of set A (even positions) in
    their original order, then the tokens of set B (odd positions) that are not protected.
    """

    protected: int
    unmerged_a: torch.Tensor  # [B, n_unmerged, 1] indices into set A (unprotected, ascending)
    merged_a: torch.Tensor  # [B, r, 1] indices into set A of the tokens merged away
    destination_b: torch.Tensor  # [B, r, 1] indices into set B that absorb them

    @property
    def r(self) -> int:
        return self.merged_a.shape[1]

    def merge(self, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Reduce ``x`` [B, N, C] to [B, N - r, C]; merged groups combine with ``reduce`` ("sum" or "amax").

        A mean is ``merge(x * size) / merge(size)``: ``scatter_reduce(mean)`` does not export to ONNX.
        """
        # One row gather lays out the whole output (prefix, unmerged A, B), then the merged A rows are added into
        # their B slots: exported, that is a Gather and a scatter instead of slicing set B, scattering into the
        # slice and concatenating (each a copy of about half the sequence).
        out = gather_rows(x, self.output_rows(x.shape[1]))
        sources = gather_rows(x, 2 * self.merged_a[..., 0])  # set A's token i sits at position 2i
        slots = self.protected + self.unmerged_a.shape[1] + self.destination_b[..., 0] - self.protected // 2
        return merge_rows(out, slots, sources, reduce)

    def own_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, N, C] laid out as :meth:`merge`'s output [B, N - r, C], each token keeping its own row: the
        merged-away tokens are dropped instead of added in (ToFu's pruning)."""
        return gather_rows(x, self.output_rows(x.shape[1]))

    def output_rows(self, num_tokens: int) -> torch.Tensor:
        """Input position [B, N - r] of every output token: the protected prefix, unmerged A, then unprotected B."""
        device = self.unmerged_a.device
        unmerged = 2 * self.unmerged_a[..., 0]
        # Broadcast against a column of the batch rather than expand(batch): a trace keeps the batch axis dynamic.
        zero = unmerged.sum(dim=1, keepdim=True) * 0  # [B, 1], also when no A token stays unmerged
        prefix = zero + torch.arange(self.protected, device=device)
        set_b = zero + 2 * torch.arange(self.protected // 2, num_tokens // 2, device=device) + 1
        return torch.cat([prefix, unmerged, set_b], dim=1)

    def new_positions(self, num_tokens: int) -> torch.Tensor:
        """For every input position, the index [B, num_tokens] of the output token that now holds it."""
        batch = self.unmerged_a.shape[0]
        device = self.unmerged_a.device
        protected_a, protected_b = (self.protected + 1) // 2, self.protected // 2
        n_unmerged = self.unmerged_a.shape[1]
        n_b = num_tokens // 2
        # Position of every set-B token in the output (protected ones keep their prefix slot).
        b_index = torch.arange(n_b, device=device)
        b_out = torch.where(b_index < protected_b, 2 * b_index + 1, self.protected + n_unmerged + b_index - protected_b)
        b_out = b_out.expand(batch, -1)
        a_out = torch.zeros(batch, (num_tokens + 1) // 2, dtype=torch.long, device=device)
        a_out[:, :protected_a] = 2 * torch.arange(protected_a, device=device)
        unmerged_slots = self.protected + torch.arange(n_unmerged, device=device).expand(batch, -1)
        a_out.scatter_(1, self.unmerged_a[..., 0], unmerged_slots)
        a_out.scatter_(1, self.merged_a[..., 0], b_out.gather(1, self.destination_b[..., 0]))
        positions = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
        positions[:, ::2] = a_out
        positions[:, 1::2] = b_out
        return positions


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1) -> Matching:
    """Match the ``r`` most similar (A, B) pairs of ``metric`` [B, N, D] (set A = even, set B = odd positions).

    ``r`` must already be clamped to ``(N - protected) // 2``. Runs without gradients: only the merge that
    applies the matching is differentiable.
    """
    num_tokens = metric.shape[1]
    if r < 0 or r > (num_tokens - protected) // 2:
        raise ValueError(f"r={r} is out of range: expected 0 <= r <= (N - protected) // 2 = "
                         f"{(num_tokens - protected) // 2} for N={num_tokens}, protected={protected}")
    protected_a, protected_b = (protected + 1) // 2, protected // 2
    with torch.no_grad():
        # Similarities in float32: in bfloat16 near-ties flip and the chosen pairs become noisy.
        metric = unit_rows(metric)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
        # Protected A tokens must never be merged away, protected B tokens must never absorb anything.
        scores[:, :protected_a, :] = -torch.inf
        scores[:, :, :protected_b] = -torch.inf
        best_score, best_partner = scores.max(dim=-1)
        # A stable order keeps results independent of the rest of the batch even when scores tie (and, unlike
        # argsort(stable=True), exports to ONNX).
        order = stable_descending_order(best_score)[..., None]
        merged_a = order[:, :r]
        # Protected A rows score -inf, so they sort last and are dropped after sorting by position.
        unmerged_a = order[:, r:].sort(dim=1).values[:, protected_a:]
        destination_b = best_partner[..., None].gather(1, merged_a)
    return Matching(protected, unmerged_a, merged_a, destination_b)
