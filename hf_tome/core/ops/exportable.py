"""Exportable forms of three ops: a stable descending order (``argsort(stable=True)`` has no ONNX form), the row
gather and the scatter that merge tokens.

Pure tensor code. :func:`stable_descending_order` is ``argsort(descending=True, stable=True)`` when running, a full
``topk`` under ``torch.onnx.export`` of either kind (ONNX's TopK is stable by its spec), and :func:`descending_order`
while another graph is being captured (``torch.export``, ``torch.jit.trace``, run by PyTorch, whose topk promises no
order among ties): there the rank of each score is counted by comparisons, ties broken by position, so ranks are
distinct integers and the order follows from one scatter. All three give the same indices for any input without NaN
(-inf included), so an exported graph merges exactly the tokens the eager model merges. The comparisons cost
``O(N^2)`` per row, small next to a layer's attention over the same N tokens, but more than a sort, hence eager
mode keeps the sort.
"""

from __future__ import annotations

import torch


def descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank [B, N] of every score of ``scores`` [B, N] when sorted from high to low, ties by lower index first."""
    num = scores.shape[-1]
    # [b, i, j] is True where score j sorts before score i: higher, or equal with a lower index.
    higher = scores[:, None, :] > scores[:, :, None]
    index = torch.arange(num, device=scores.device)
    earlier_tie = (scores[:, None, :] == scores[:, :, None]) & (index[None, :] < index[:, None])
    return (higher | earlier_tie).sum(dim=-1)


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices [B, N] that sort ``scores`` [B, N] from high to low; ties keep their order (a stable sort)."""
    rank = descending_rank(scores)
    index = torch.arange(scores.shape[-1], device=scores.device).expand_as(rank)
    return torch.zeros_like(rank).scatter(1, rank, index)


def capturing_graph() -> bool:
    """True while ``torch.export``, ``torch.onnx.export`` (dynamo or TorchScript) or ``torch.jit.trace`` runs."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or (is_exporting and is_exporting()))


def stable_descending_order(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argsort(dim=-1, descending=True, stable=True)`` [B, N], in a form every exporter can write."""
    if torch.onnx.is_in_onnx_export():
        # ONNX's TopK breaks ties by the lower index (its spec's rule), so a full TopK is a stable descending sort:
        # one node where the comparison count below takes eight, each waking the runtime's threads.
        return scores.topk(scores.shape[-1], dim=-1).indices
    if capturing_graph():
        return descending_order(scores)
    return scores.argsort(dim=-1, descending=True, stable=True)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.gather(1, index[..., None].expand(-1, -1, C))`` [B, K, C] for ``x`` [B, N, C] and ``index`` [B, K].

    Written as one row gather on the flattened batch: exported, the expanded form materialises a [B, K, C] int64
    index (an ``Expand``) for a ``GatherElements`` that reads it element by element; the flat form is a single
    ``Gather`` that copies whole rows.
    """
    if index.shape[1] == 0:
        return x[:, :0]
    channels = x.shape[-1]
    return x.reshape(-1, channels).index_select(0, _flat_rows(index, x.shape[1])).reshape(-1, index.shape[1], channels)


def add_rows(target: torch.Tensor, index: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """``target`` [B, M, C] with each row of ``sources`` [B, K, C] added to row ``index`` [B, K] of its sample.

    ``target.scatter_add(1, index[..., None].expand(-1, -1, C), sources)`` as one ``index_add`` of whole rows on the
    flattened batch (see :func:`gather_rows`), which runs as a row-wise scatter instead of an element-wise one.
    """
    if index.shape[1] == 0:
        return target
    channels = target.shape[-1]
    flat = target.reshape(-1, channels).index_add(0, _flat_rows(index, target.shape[1]), sources.reshape(-1, channels))
    return flat.reshape(-1, target.shape[1], channels)


def _flat_rows(index: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    """Indices [B * K] into the flattened batch for per-sample row indices ``index`` [B, K]."""
    # The batch offsets come from a cumulative sum over the batch axis, not from ``index.shape[0]``, which a trace
    # would freeze into a constant (the dynamic batch axis would break).
    batch_start = (torch.ones_like(index[:, :1]).cumsum(dim=0) - 1) * rows_per_sample
    return (index + batch_start).reshape(-1)


def unit_rows(metric: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.normalize(metric.float(), dim=-1)`` (the same values), whose exported form divides by a
    broadcast norm instead of materialising it with an ``Expand``."""
    wide = metric.float()
    return wide / wide.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def merge_rows(target: torch.Tensor, index: torch.Tensor, sources: torch.Tensor, reduce: str) -> torch.Tensor:
    """Rows of ``sources`` [B, K, C] reduced into rows ``index`` [B, K] of ``target`` [B, M, C] (``include_self``):
    ``"sum"`` by :func:`add_rows`, other reductions (``"amax"``) by :func:`scatter_into`.

    Under ``torch.jit.trace`` (the TorchScript ONNX exporter) sums take the element-wise scatter too: that exporter
    writes ``index_add`` as a ``ScatterND`` without reduction, where of two sources for one row only the last counts.
    """
    if reduce == "sum" and not torch.jit.is_tracing():
        return add_rows(target, index, sources)
    return scatter_into(target, index[..., None].expand(-1, -1, target.shape[-1]), sources, reduce)


def scatter_into(target: torch.Tensor, index: torch.Tensor, sources: torch.Tensor, reduce: str) -> torch.Tensor:
    """``target.scatter_reduce(1, index, sources, reduce)`` (``include_self``): sums as ``scatter_add``, which every
    exporter writes as one ``ScatterElements(reduction="add")`` (the TorchScript exporter wraps ``scatter_reduce`` in
    an ``If`` whose shapes onnxruntime mis-infers), other reductions (``"amax"``) as they are."""
    if reduce == "sum":
        return target.scatter_add(1, index, sources)
    return target.scatter_reduce(1, index, sources, reduce=reduce)
