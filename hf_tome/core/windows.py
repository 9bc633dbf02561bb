"""Token merging inside attention windows (Swin), as tensor code: matching that keeps shift regions apart, the
member each merged token is read at, and the additive attention bias of merged queries and keys.

See ``hf_tome.adapters.swin`` for how a Swin layer uses them and why the bias rules are what they are.
"""

import torch
from torch import nn

from hf_tome.core.ops import Matching, bipartite_soft_matching
from hf_tome.core.ops.exportable import unit_rows


def match_windows(metric: torch.Tensor, r: int, labels: torch.Tensor | None) -> Matching:
    """Bipartite soft matching of ``r`` pairs inside every window of ``metric`` [B*nW, N, C].

    ``labels`` [B*nW, N] keep differently labelled tokens apart: appending ``2 * one_hot(label)`` to the unit
    metric turns same-label scores into ``(cos + 4) / 5 >= 0.6`` and cross-label ones into ``<= 0.2``, so the
    shared matching op is reused unchanged. A region at least 2 tokens wide holds both even (A) and odd (B)
    positions, so every A token finds a same-label partner; only a 1-wide padding column of an even window can
    lack one, and its tokens then merge across only when r exceeds the same-label pairs.
    """
    if labels is not None:
        unit = unit_rows(metric)
        one_hot = nn.functional.one_hot(labels, num_classes=18).to(unit.dtype)
        metric = torch.cat([unit, 2.0 * one_hot], dim=-1)
    return bipartite_soft_matching(metric, r, protected=0)


def group_members(matching: Matching, num_tokens: int) -> torch.Tensor:
    """One original window position [B*nW, M] per merged token: the unmerged A token, or the B token absorbing
    (the layout :meth:`Matching.merge` writes; windows protect nothing)."""
    return matching.output_rows(num_tokens)


def merged_window_bias(positions: torch.Tensor, members: torch.Tensor, position_bias: torch.Tensor,
                       size: torch.Tensor, shift_mask: torch.Tensor | None, prop_attn: bool,
                       rule: str = "logsumexp") -> torch.Tensor:
    """Additive attention bias [B*nW, H, M, M] on merged tokens (see the module docstring for both rules).

    positions: [B*nW, N] merged token holding each window position; members: [B*nW, M] from
    :func:`group_members`; position_bias: [H, N, N] relative position bias of the full window; size: [B*nW, M, 1]
    group sizes; shift_mask: [nW, N, N] Swin's shift mask, or None.
    """
    heads, num_tokens, _ = position_bias.shape
    windows, merged = size.shape[0], size.shape[1]
    pair = members[:, :, None] * num_tokens + members[:, None, :]  # [B*nW, M, M] flat (query, key) index
    log_size = size.log().view(windows, 1, 1, merged)
    if rule == "representative":
        bias = position_bias.reshape(heads, -1)[:, pair].transpose(0, 1)
        bias = bias + log_size if prop_attn else bias.contiguous()
    else:
        # Query side: a merged query is the mean of its members, so its logit row is the mean of theirs.
        query_index = positions[:, None, :, None].expand(-1, heads, -1, num_tokens)
        rows = position_bias.new_zeros(windows, heads, merged, num_tokens).scatter_add(
            2, query_index, position_bias.expand(windows, -1, -1, -1))
        rows = rows / size.view(windows, 1, merged, 1)
        # Key side: logsumexp over each key group (what identical member keys add up to), stabilised per row.
        row_max = rows.detach().amax(dim=-1, keepdim=True)
        key_index = positions[:, None, None, :].expand(-1, heads, merged, -1)
        key_sum = rows.new_zeros(windows, heads, merged, merged).scatter_add(3, key_index, (rows - row_max).exp())
        bias = key_sum.log() + row_max
        if not prop_attn:
            bias = bias - log_size
    if shift_mask is not None:
        # Windows are batch-major, so window w uses mask w % nW; a group lies in one region, any member will do.
        window = torch.arange(windows, device=positions.device) % shift_mask.shape[0]
        bias = bias + shift_mask.reshape(-1)[window[:, None, None] * num_tokens**2 + pair][:, None]
    return bias
