"""`ToMeConfig`: every setting of token merging / pruning in one JSON-serialisable object.

The config is stored on a patched model as a plain dict under ``model.config.tome`` (a dataclass does not
survive ``save_pretrained``), and rebuilt with :meth:`ToMeConfig.from_dict` when the model is loaded again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MERGE_MATCHES = ("class_attention", "bipartite")
"""How the merge step of unified compression picks what to merge (see ``ToMeConfig.merge_match``)."""

MERGE_RULES = ("bipartite", "pitome", "agglomerative")
"""Which tokens a bipartite merge step merges (see ``ToMeConfig.merge_rule``)."""

MERGE_MODES = ("mean", "mlerp")
"""How a merged group's hidden state is formed (see ``ToMeConfig.merge_mode``)."""


def _invalid(field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"ToMeConfig.{field_name}={value!r} is invalid: expected {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unknown_fields(names: Any) -> ValueError | None:
    """The error for names that are not ``ToMeConfig`` fields, or None when every name is one."""
    known = {f.name for f in fields(ToMeConfig)}
    unknown = sorted(set(names) - known)
    if not unknown:
        return None
    return ValueError(f"unknown ToMeConfig field(s) {unknown}: expected some of {sorted(known)}")


def _check_kept_list(name: str, kept: Any) -> None:
    """Kept-token lists must be positive ints that never grow with depth."""
    if kept is None:
        return
    allowed = "a non-empty list of positive ints, non-increasing with depth"
    if not isinstance(kept, list | tuple) or not kept or not all(_is_int(k) and k > 0 for k in kept):
        raise _invalid(name, kept, allowed)
    for depth in range(1, len(kept)):
        if kept[depth] > kept[depth - 1]:
            raise _invalid(name, kept, f"{allowed} (layer {depth} keeps {kept[depth]} > {kept[depth - 1]})")


@dataclass
class ToMeConfig:
    """Settings of token merging (ToMe) and unified token compression for one model.

    Args:
        r: tokens merged away in every layer (an int), ToMe's ``(r, inflect)`` pair (a tuple: ``r=(16, -1)`` is
            ``r=16, inflect=-1.0``, which is what the config stores), or an explicit per-layer list (padded with 0
            when shorter than the model). r is clamped per layer to half of the unprotected tokens.
        inflect: shape of the schedule for an int ``r``, in [-1, 1]: 0 is constant, -1 decreases from 2r
            to 0 across depth, +1 increases from 0 to 2r. Ignored when ``r`` is a list; a tuple ``r`` sets it
            (an ``inflect=`` given with it must be the same).
        prop_attn: add ``log(size)`` of each key token to the attention logits (proportional attention).
        trace_source: track which original patches every token holds (needed for visualisation).
        prune_kept: per-layer number of tokens kept after pruning by class attention (unified compression).
        merge_kept: per-layer number of tokens kept after merging (unified compression). Block 0 is left alone
            when ``prune_kept[0] == merge_kept[0]`` is the number of tokens entering the model (the spec's rule);
            smaller counts compress it too.
        merge_match: how unified compression picks what to merge: ``"class_attention"`` (the tokens ranked
            between ``merge_kept`` and ``prune_kept`` by class attention go into their most similar kept token)
            or ``"bipartite"`` (ToMe's bipartite soft matching on the tokens that survive pruning; at most half
            of the unprotected tokens per layer).
        budget_table: rows ``{"gflops", "prune_kept", "merge_kept", "accuracy"}`` found by a rate search (and
            ``"merge_match"`` where the row does not use class attention).
        budget: the FLOPs budget (GFLOPs, or a fraction of the full model's) picked from ``budget_table``.
        extra: family-specific settings (e.g. Swin's ``"swin_stage_r"``); keys the family does not read are refused.
        merge_rule: which ``r`` tokens a merge step merges, wherever ToMe's bipartite soft matching would run (the r
            schedule, and ``merge_match="bipartite"`` after pruning): ``"bipartite"`` (ToMe: set A = even, set B =
            odd positions, the r most similar pairs merge) or ``"pitome"`` (PiToMe: the 2r tokens of highest
            energy on the keys' cosine-similarity graph split alternately into A and B, all of A merges into B;
            isolated, low-energy tokens are never merged) or ``"agglomerative"`` (ATC: average-linkage clustering
            on the keys' cosine similarities, the closest two clusters joining r times, so a cluster may grow past
            two tokens in one layer). Each removes exactly r tokens per layer.
        merge_mode: how a merged group's hidden state is formed: ``"mean"`` (ToMe's size-weighted mean) or
            ``"mlerp"`` (ToFu's MLERP: the size-weighted mean direction, rescaled to the size-weighted mean of the
            members' norms). Sizes and sources are summed either way. Applies to every hard merge (ToMe's, PiToMe's
            and prune + merge's).
        prune_matched_layers: in this many layers from the first, a merge step prunes instead of merging (ToFu's
            token fusion): each matched token is dropped and its partner keeps its own hidden state, while sizes
            and sources still add up, so proportional attention and size-weighted pooling count both. Early layers
            respond non-linearly to averaged inputs; later layers then merge with ``merge_mode``. 0 (the default)
            merges everywhere.
    """

    r: int | tuple[int, float] | list[int] = 0  # a tuple is stored as r and inflect
    inflect: float = 0.0
    prop_attn: bool = True
    trace_source: bool = False
    prune_kept: list[int] | None = None
    merge_kept: list[int] | None = None
    merge_match: str = "class_attention"
    budget_table: list[dict[str, Any]] | None = None
    budget: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Last, so positional arguments keep their meaning.
    merge_rule: str = "bipartite"
    merge_mode: str = "mean"
    prune_matched_layers: int = 0

    def __new__(cls, *args: Any, **kwargs: Any) -> ToMeConfig:
        # Checked before the dataclass __init__, which would raise a bare TypeError for an unknown keyword.
        error = _unknown_fields(kwargs)
        if error is not None:
            raise error
        config = super().__new__(cls)
        if "inflect" in kwargs or len(args) > 1:
            config._inflect_given = True  # read (and dropped) by __post_init__
        return config

    def __post_init__(self) -> None:
        inflect_given = self.__dict__.pop("_inflect_given", False)
        if isinstance(self.r, tuple):
            self._split_r_pair(inflect_given)
        if isinstance(self.prune_kept, tuple):
            self.prune_kept = list(self.prune_kept)
        if isinstance(self.merge_kept, tuple):
            self.merge_kept = list(self.merge_kept)
        self.validate()

    def _split_r_pair(self, inflect_given: bool) -> None:
        """``r=(16, -1)`` (ToMe's notation) becomes ``r=16, inflect=-1.0``."""
        pair = self.r
        if (len(pair) != 2 or not _is_int(pair[0]) or pair[0] < 0 or not _is_number(pair[1])
                or not -1 <= pair[1] <= 1):
            raise _invalid("r", pair, "an (r, inflect) pair of an int r >= 0 and a number inflect in [-1, 1] "
                                      "(a list gives one r per layer)")
        if inflect_given and self.inflect != pair[1]:
            raise ValueError(f"ToMeConfig.r={pair!r} sets inflect={pair[1]!r}, but inflect={self.inflect!r} is given "
                             f"too: expected one of the two (r={pair!r}, or r={pair[0]} with inflect={self.inflect!r})")
        self.r, self.inflect = pair[0], float(pair[1])

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, the value and what is allowed, for the first invalid field."""
        if _is_int(self.r):
            if self.r < 0:
                raise _invalid("r", self.r, "an int >= 0 or a list of ints >= 0")
        elif isinstance(self.r, list):
            if not all(_is_int(x) and x >= 0 for x in self.r):
                raise _invalid("r", self.r, "an int >= 0 or a list of ints >= 0")
        else:
            raise _invalid("r", self.r, "an int >= 0 or a list of ints >= 0")
        if isinstance(self.inflect, bool) or not isinstance(self.inflect, int | float) or not -1 <= self.inflect <= 1:
            raise _invalid("inflect", self.inflect, "a number in [-1, 1]")
        for flag in ("prop_attn", "trace_source"):
            if not isinstance(getattr(self, flag), bool):
                raise _invalid(flag, getattr(self, flag), "True or False")
        _check_kept_list("prune_kept", self.prune_kept)
        _check_kept_list("merge_kept", self.merge_kept)
        if (self.prune_kept is None) != (self.merge_kept is None):
            raise _invalid("merge_kept", self.merge_kept, "given together with prune_kept (both or neither)")
        if self.prune_kept is not None:
            if len(self.prune_kept) != len(self.merge_kept):
                raise _invalid("merge_kept", self.merge_kept, f"a list as long as prune_kept ({len(self.prune_kept)})")
            for depth, (pruned, merged) in enumerate(zip(self.prune_kept, self.merge_kept, strict=True)):
                if merged > pruned:
                    raise _invalid("merge_kept", self.merge_kept, f"<= prune_kept at every layer (layer {depth})")
            if self.uses_merging_schedule:
                raise _invalid("r", self.r, "0 when prune_kept/merge_kept are given (one reducer per model)")
        if self.merge_match not in MERGE_MATCHES:
            raise _invalid("merge_match", self.merge_match, " or ".join(repr(m) for m in MERGE_MATCHES))
        if self.merge_rule not in MERGE_RULES:
            raise _invalid("merge_rule", self.merge_rule, " or ".join(repr(m) for m in MERGE_RULES))
        if self.merge_mode not in MERGE_MODES:
            raise _invalid("merge_mode", self.merge_mode, " or ".join(repr(m) for m in MERGE_MODES))
        if not _is_int(self.prune_matched_layers) or self.prune_matched_layers < 0:
            raise _invalid("prune_matched_layers", self.prune_matched_layers, "an int >= 0 (layers from the first)")
        if self.budget_table is not None:
            if not isinstance(self.budget_table, list) or not all(
                isinstance(row, dict) and {"gflops", "prune_kept", "merge_kept"} <= row.keys()
                and row.get("merge_match", "class_attention") in MERGE_MATCHES
                for row in self.budget_table
            ):
                raise _invalid("budget_table", self.budget_table,
                               "a list of dicts with keys 'gflops', 'prune_kept', 'merge_kept' (and optionally "
                               f"'merge_match', one of {list(MERGE_MATCHES)})")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int | float)
                                        or self.budget <= 0):
            raise _invalid("budget", self.budget, "a positive number (GFLOPs, or a fraction <= 1 of the full model)")
        if not isinstance(self.extra, dict):
            raise _invalid("extra", self.extra, "a dict")

    @property
    def uses_merging_schedule(self) -> bool:
        """True when an r schedule (not a kept-count list) reduces tokens."""
        return (self.r > 0) if _is_int(self.r) else any(x > 0 for x in self.r)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict (what is stored under ``config.tome``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToMeConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise ``ValueError`` listing the known ones."""
        error = _unknown_fields(data)
        if error is not None:
            raise error
        return cls(**data)

    def to_json_string(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> ToMeConfig:
        """Inverse of :meth:`to_json_string`."""
        return cls.from_dict(json.loads(text))

    def merging(self, **requested: Any) -> dict[str, Any]:
        """This config's merge options (:data:`MERGE_OPTIONS`) as keywords, each replaced by ``requested``'s value
        unless that is None (a search or evaluation that asks for nothing keeps the saved setting)."""
        unknown = set(requested) - set(MERGE_OPTIONS)
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not merge options: expected some of {MERGE_OPTIONS}")
        return {name: getattr(self, name) if requested.get(name) is None else requested[name]
                for name in MERGE_OPTIONS}

    def replace(self, **changes: Any) -> ToMeConfig:
        """A validated copy with some fields changed (a tuple ``r`` replaces ``inflect`` too)."""
        data = {**self.to_dict(), **changes}
        if isinstance(changes.get("r"), tuple) and "inflect" not in changes:
            del data["inflect"]  # the pair's inflect, not this config's
        return ToMeConfig.from_dict(data)


MERGE_OPTIONS = ("merge_rule", "merge_mode", "prune_matched_layers")
"""The fields that say how a hard merge step merges (rather than how many tokens it merges)."""
MERGE_OPTION_DEFAULTS = {item.name: item.default for item in fields(ToMeConfig) if item.name in MERGE_OPTIONS}
"""ToMe's own merging: ``{"merge_rule": "bipartite", "merge_mode": "mean", "prune_matched_layers": 0}``."""
