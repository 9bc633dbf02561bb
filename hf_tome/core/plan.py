"""Reduction plans: what the encoder loop does in each layer, as plain values (no transformers).

A plan is derived from a ``ToMeConfig`` for one model (``hf_tome.build_plan``) and handed to the forward; the
layers read their per-layer settings from it (``ReductionPlan.kept_for_layer``).
"""

from dataclasses import dataclass

import torch

from hf_tome.core.ops.pitome import pitome_margin


@dataclass(frozen=True)
class SoftKept:
    """Relaxed kept counts of one layer (differentiable rate search), indexed by class-attention rank.

    keep: [N] probability that the token of rank j stays itself, P(merge_kept > j).
    prune: [N] probability that it survives pruning, P(prune_kept > j); ``prune - keep`` of it is merged.
    slots: merged tokens go to their most similar token among the top ``slots`` ranks.
    """

    keep: torch.Tensor
    prune: torch.Tensor
    slots: int


@dataclass(frozen=True)
class HardKept:
    """Kept counts of one layer: prune to ``prune_kept`` by class attention, then merge down to ``merge_kept``.

    ``merge_match="class_attention"`` (the spec's rule) merges the tokens ranked between ``merge_kept`` and
    ``prune_kept`` into their most similar higher-ranked token; ``"bipartite"`` merges the survivors of pruning by
    ToMe's bipartite soft matching instead (the most similar pairs go first), which suits models whose head
    averages the tokens, where class attention says little about which tokens are redundant.
    """

    prune_kept: int
    merge_kept: int
    merge_match: str = "class_attention"


@dataclass(frozen=True)
class LayerMerge:
    """How one layer merges, when it is not ToMe's default (bipartite matching, size-weighted mean).

    rule: ``"bipartite"``, ``"pitome"`` or ``"agglomerative"`` (see ``ToMeConfig.merge_rule``). mode: ``"mean"``
    or ``"mlerp"`` (see ``ToMeConfig.merge_mode``), or ``"prune"`` in the first ``ToMeConfig.prune_matched_layers``
    layers. margin: PiToMe's energy margin at this layer's depth (read by ``"pitome"`` only).
    """

    rule: str = "bipartite"
    mode: str = "mean"
    margin: float = 0.0


LayerKept = HardKept | SoftKept
"""What :func:`run_layers` hands a layer as ``tome_kept``: a :class:`HardKept` or a :class:`SoftKept`."""


@dataclass(frozen=True)
class ReductionPlan:
    """What the encoder loop does in each layer: an immutable value, built once per configuration.

    ``hf_tome.build_plan(model, config)`` derives it from a ``ToMeConfig`` and checks it against the model;
    ``hf_tome.apply`` stores one as the model's default, and any forward can run another without re-patching:
    ``model(pixel_values, tome_plan=plan)`` (so one model serves several budgets, from several threads too).
    Lists given to the constructor are stored as tuples.

    ``layer_r`` drives ToMe merging. ``prune_kept``/``merge_kept`` (unified compression, one count per layer)
    or ``soft_kept`` (the differentiable search) switch a layer to prune-then-merge by class attention; the
    first layer too, when its counts are below the tokens entering the model. Adapters that support them accept
    a ``tome_kept`` keyword (see :func:`run_layers`); adapters that do not are never handed one.

    ``merge_rule``, ``merge_mode`` and ``prune_matched_layers`` (``ToMeConfig``'s fields of the same names) reach a
    layer as a :class:`LayerMerge` keyword ``tome_merge`` (:meth:`merge_for_layer`), only when one differs from
    ToMe's default, so layers that do not take it see nothing new under the defaults.
    """

    layer_r: tuple[int, ...]
    protected: int
    prop_attn: bool = True
    trace_source: bool = False
    prune_kept: tuple[int, ...] | None = None
    merge_kept: tuple[int, ...] | None = None
    soft_kept: tuple[SoftKept | None, ...] | None = None
    merge_match: str = "class_attention"
    merge_rule: str = "bipartite"
    merge_mode: str = "mean"
    prune_matched_layers: int = 0

    def __post_init__(self) -> None:
        for name in ("layer_r", "prune_kept", "merge_kept", "soft_kept"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))  # frozen: the one place a field is set after init

    @property
    def num_layers(self) -> int:
        return len(self.layer_r)

    def kept_for_layer(self, index: int) -> LayerKept | None:
        """The ``tome_kept`` argument of layer ``index`` (None: plain ToMe with ``layer_r[index]``)."""
        # Block 0 is compressed only when its counts are below the tokens entering the model (the spec's rule
        # leaves it alone: counts equal to the input's, which reduce nothing).
        if self.soft_kept is not None:
            return self.soft_kept[index]
        if self.prune_kept is not None:
            return HardKept(self.prune_kept[index], self.merge_kept[index], self.merge_match)
        return None

    def merge_for_layer(self, index: int) -> LayerMerge | None:
        """The ``tome_merge`` argument of layer ``index`` (None: ToMe's bipartite matching and mean)."""
        mode = "prune" if index < self.prune_matched_layers else self.merge_mode
        if self.merge_rule == "bipartite" and mode == "mean":
            return None
        return LayerMerge(self.merge_rule, mode, pitome_margin(index, self.num_layers))
