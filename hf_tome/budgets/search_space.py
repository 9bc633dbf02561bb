"""The space of per-layer kept counts searched by ``hf-tome search``, and its FLOPs (MACs) accounting.

Pure Python (no torch): a candidate is a removal *profile* (how far token removal has progressed by each layer,
non-decreasing from 0 to 1), a *prune share* per layer (which part of a layer's removal is pruning rather than
merging) and a *scale*. The scale is fitted by bisection so that the candidate lands just under a FLOPs target,
which puts every random candidate inside its target's bucket instead of wasting most of them between buckets.

Most uniformly random profiles and shares are poor (on the embedded DINOv2-S model, pruning more than a few
percent of a layer's removal, or removing evenly from layer 1 on, costs several times the KL divergence of
back-loaded merging), so by default three quarters of the candidates come from :func:`shaped_profile`:
ToMe-like power-law profiles with random curvature, start and noise, and small prune shares.

Every candidate also carries a merge rule (``merge_match``): the candidates take the requested rules in turn,
so the search can find that a model is better served by class-attention merging or by bipartite matching.

Block 0 is compressed like any other layer unless the space protects it (``protect_block_0``, the spec's rule,
which measurably costs accuracy on DINOv2-S). :func:`tome_seeds` writes ToMe's own schedules (constant r and
``(r, inflect)``, bipartite merging in every block, block 0 included) as kept counts at each target, so a search
can always compare against them on the same images.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hf_tome.config import MERGE_MATCHES
from hf_tome.core.macs import EncoderShape, nearest_r
from hf_tome.core.schedule import (
    decaying_schedule,
    fewest_after_matching,
    kept_tokens_per_layer,
    merge_schedule,
    smallest_scale_within,
    tokens_per_layer,
)
from hf_tome.integration.flops import encoder_report


@dataclass(frozen=True)
class Candidate:
    """One point of the search: kept counts per layer, their GMACs, and the target (bucket) it belongs to.

    ``origin`` says where it came from: ``"random"``, ``"canonical"``, ``"diffrate"`` or ToMe's schedule
    (``"tome r=12"``, ``"tome r=12 inflect=-0.5"``; see :func:`tome_seeds`).
    """

    prune_kept: tuple[int, ...]
    merge_kept: tuple[int, ...]
    gmacs: float
    target: int = 0
    merge_match: str = "class_attention"
    origin: str = "random"

    @property
    def is_tome_seed(self) -> bool:
        """True for ToMe's own schedules (:func:`tome_seeds`), which join a staged search at its last stage."""
        return self.origin.startswith("tome")

    @property
    def setting(self) -> tuple[tuple[int, ...], tuple[int, ...], str]:
        """What :meth:`hf_tome.budgets.search_eval.CachedEvaluator.evaluate` takes for this candidate."""
        return self.prune_kept, self.merge_kept, self.merge_match


@dataclass(frozen=True)
class SearchSpace:
    """Kept-count vectors for an encoder with ``shape`` (``num_patches`` set to the searched input size).

    Every layer keeps at least ``min_kept`` tokens (the protected ones plus at least one patch token). With
    ``protect_block_0`` block 0 keeps every token (the spec's rule) and profiles cover layers 1..L-1; without
    it they cover all L layers.
    """

    shape: EncoderShape
    min_kept: int
    protect_block_0: bool = False

    @classmethod
    def for_shape(cls, shape: EncoderShape, min_fraction: float = 0.05,
                  protect_block_0: bool = False) -> SearchSpace:
        """The space for ``shape``; at least ``min_fraction`` of the patch tokens survive every layer."""
        floor = shape.protected + max(1, round(min_fraction * shape.num_patches))
        return cls(shape, floor, protect_block_0)

    @classmethod
    def for_tokens(cls, shape: EncoderShape, num_tokens: int, min_fraction: float = 0.05,
                   protect_block_0: bool = False) -> SearchSpace:
        """The space for ``num_tokens`` tokens entering block 0 (protected included)."""
        return cls.for_shape(replace(shape, num_patches=num_tokens - shape.protected), min_fraction, protect_block_0)

    @property
    def first_layer(self) -> int:
        """The first layer a candidate may compress: 1 with ``protect_block_0``, else 0."""
        return 1 if self.protect_block_0 else 0

    @property
    def steps(self) -> int:
        """How many layers a profile covers (the compressible ones)."""
        return self.num_layers - self.first_layer

    @property
    def num_tokens(self) -> int:
        return self.shape.num_patches + self.shape.protected

    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    def gmacs(self, prune_kept: list[int] | tuple[int, ...], merge_kept: list[int] | tuple[int, ...]) -> float:
        """GMACs per image of a configuration (the spec's formula, see :mod:`hf_tome.integration.flops`)."""
        counts = kept_tokens_per_layer(self.num_tokens, prune_kept, merge_kept)
        return encoder_report(self.shape, counts[1:]).gmacs

    @property
    def full_gmacs(self) -> float:
        """GMACs of the uncompressed model."""
        full = [self.num_tokens] * self.num_layers
        return self.gmacs(full, full)

    def kept_lists(self, profile: list[float], share: list[float], scale: float,
                   merge_match: str = "class_attention") -> tuple[list[int], list[int]]:
        """Kept counts from a profile (one value per compressible layer, :attr:`steps`), prune shares and a scale
        in [0, 1].

        Compressible layer i keeps ``N - round(scale * profile[i - first_layer] * (N - min_kept))`` tokens after
        merging (a protected block 0 keeps all N); of what it removes, ``round(share[i - first_layer] * removed)``
        tokens are pruned and the rest merged. With ``"bipartite"`` matching a layer merges at most half of the
        unprotected survivors of pruning; the removal it cannot merge is left to the next layers.
        """
        total = self.num_tokens
        prune_kept, merge_kept = [total] * self.first_layer, [total] * self.first_layer
        tokens = total
        for depth_profile, depth_share in zip(profile, share, strict=True):
            merged = min(tokens, total - round(scale * depth_profile * (total - self.min_kept)))
            pruned = round(depth_share * (tokens - merged))
            if merge_match == "bipartite":
                survivors = tokens - pruned
                merged = max(merged, fewest_after_matching(survivors, self.shape.protected))
            prune_kept.append(tokens - pruned)
            merge_kept.append(merged)
            tokens = merged
        return prune_kept, merge_kept

    def fit(self, profile: list[float], share: list[float], target_gmacs: float,
            target_index: int = 0, merge_match: str = "class_attention") -> Candidate | None:
        """The candidate of this profile and share with the most GMACs not above ``target_gmacs``.

        Returns None when even the full scale stays above the target.
        """
        def gmacs_at(scale: float) -> float:
            return self.gmacs(*self.kept_lists(profile, share, scale, merge_match))

        if gmacs_at(1.0) > target_gmacs:
            return None
        low, high = 0.0, 1.0  # GMACs fall as the scale grows: find the smallest scale under the target
        for _ in range(30):
            middle = (low + high) / 2
            if gmacs_at(middle) > target_gmacs:
                low = middle
            else:
                high = middle
        prune_kept, merge_kept = self.kept_lists(profile, share, high, merge_match)
        return Candidate(tuple(prune_kept), tuple(merge_kept), self.gmacs(prune_kept, merge_kept), target_index,
                         merge_match)

    def tome_kept_lists(self, r: int, inflect: float = 0.0) -> tuple[list[int], list[int]]:
        """ToMe's ``(r, inflect)`` schedule as kept counts: no pruning, bipartite merging of the schedule's r in
        every layer (clamped like ToMe's), block 0 included unless the space protects it. Run with
        ``merge_match="bipartite"`` it is ToMe itself."""
        schedule = merge_schedule(r, self.num_layers, inflect)
        schedule[: self.first_layer] = [0] * self.first_layer
        counts = tokens_per_layer(self.num_tokens, schedule, self.shape.protected)
        return counts[:-1], counts[1:]

    def tome_gmacs(self, r: int, inflect: float = 0.0) -> float:
        """GMACs per image of :meth:`tome_kept_lists`."""
        return self.gmacs(*self.tome_kept_lists(r, inflect))

    def decaying_kept_lists(self, scale: float, decay: float,
                            first: int | None = None) -> tuple[list[int], list[int]]:
        """A decaying schedule (:func:`~hf_tome.core.schedule.decaying_schedule`, counted from the first
        compressible layer, whose step ``first`` fixes when given) as kept counts, like :meth:`tome_kept_lists`."""
        schedule = [0] * self.first_layer + decaying_schedule(scale, decay, self.steps, first)
        counts = tokens_per_layer(self.num_tokens, schedule, self.shape.protected)
        return counts[:-1], counts[1:]

    def decaying_fit(self, decay: float, target_gmacs: float,
                     first: int | None = None) -> tuple[list[int], list[int]] | None:
        """The decaying schedule of ``decay`` (with its first step ``first``, if given) with the most GMACs not above
        ``target_gmacs`` (None: out of reach)."""
        high = float(self.num_tokens) / decay ** self.steps  # every layer merges all it can
        scale = smallest_scale_within(lambda value: self.gmacs(*self.decaying_kept_lists(value, decay, first)),
                                      target_gmacs, high)
        return None if scale is None else self.decaying_kept_lists(scale, decay, first)


def random_profile(rng: random.Random, num_layers: int, first_layer: int = 1) -> tuple[list[float], list[float]]:
    """A random removal profile and prune shares for layers ``first_layer``..L-1 (1: block 0 left alone).

    Profiles are cumulative Dirichlet draws (sometimes starting late), so removal can be front-loaded, even or
    concentrated in a few layers. Shares cluster around a per-candidate mix, with pure merging and pure pruning
    each drawn 15% of the time.
    """
    steps = num_layers - first_layer
    concentration = 10 ** rng.uniform(-0.7, 0.7)
    increments = [rng.gammavariate(concentration, 1.0) for _ in range(steps)]
    if rng.random() < 0.5:
        start = rng.randrange(0, max(1, steps // 2 + 1))
        increments = [0.0] * start + increments[start:]
    total = sum(increments) or 1.0
    profile, running = [], 0.0
    for increment in increments:
        running += increment / total
        profile.append(min(1.0, running))
    draw = rng.random()
    mix = 0.0 if draw < 0.15 else 1.0 if draw < 0.3 else rng.random()
    if mix in (0.0, 1.0):
        share = [mix] * steps
    else:
        share = [min(1.0, max(0.0, rng.gauss(mix, 0.15))) for _ in range(steps)]
    return profile, share


def shaped_profile(rng: random.Random, num_layers: int, first_layer: int = 1) -> tuple[list[float], list[float]]:
    """A random schedule shaped like a good one, and small prune shares, for layers ``first_layer``..L-1.

    The profile follows ``((i + 1) / n) ** gamma`` from a start layer on (``gamma`` log-uniform in [0.5, 3]:
    front-loaded, even like constant-r ToMe, or back-loaded; removal starts late 30% of the time), with
    log-normal noise of a random strength on each layer's increment. Half of the candidates merge only; the
    others prune a per-candidate share drawn up to 0.3 (more often near 0), jittered per layer.
    """
    steps = num_layers - first_layer
    start = rng.randrange(1, steps // 3 + 1) if rng.random() < 0.3 and steps > 3 else 0
    gamma = math.exp(rng.uniform(math.log(0.5), math.log(3.0)))
    noise = rng.uniform(0.0, 0.5)
    length = steps - start
    curve = [0.0] * start + [((i + 1) / length) ** gamma for i in range(length)]
    increments = [(now - before) * math.exp(rng.gauss(0.0, noise))
                  for before, now in zip([0.0, *curve[:-1]], curve, strict=True)]
    total = sum(increments) or 1.0
    profile, running = [], 0.0
    for increment in increments:
        running += increment / total
        profile.append(min(1.0, running))
    if rng.random() < 0.5:
        return profile, [0.0] * steps
    mix = 0.3 * rng.random() ** 2
    return profile, [min(1.0, max(0.0, rng.gauss(mix, 0.05))) for _ in range(steps)]


def canonical_profiles(num_layers: int, first_layer: int = 1) -> list[tuple[list[float], list[float]]]:
    """A few hand-made shapes tried before the random ones: even removal per layer (like constant-r ToMe) and
    front-loaded removal (like ToMe's decreasing schedule), each as pure merging, half-and-half and pure pruning,
    for layers ``first_layer``..L-1.
    """
    steps = num_layers - first_layer
    even = [(i + 1) / steps for i in range(steps)]
    weights = [steps - i for i in range(steps)]
    front = [sum(weights[: i + 1]) / sum(weights) for i in range(steps)]
    return [(profile, [share] * steps) for profile in (even, front) for share in (0.0, 0.5, 1.0)]


def tome_seeds(space: SearchSpace, targets_gmacs: Sequence[float], inflects: Sequence[float] = (0.0, -0.5, 0.5),
               decays: Sequence[float] = (), first_steps: Sequence[int] = ()) -> list[Candidate]:
    """ToMe's own schedules at every target: for each ``inflect``, the smallest r whose ``(r, inflect)`` schedule
    costs at most the target (as ``hf_tome.integration.flops.constant_r_for_macs`` picks it), written as kept counts
    (:meth:`SearchSpace.tome_kept_lists`) with ``merge_match="bipartite"`` and ``origin="tome r=..."``.

    A target within 1e-9 (relative) of a schedule's GMACs counts as reaching it (targets computed from ToMe's own
    MACs round-trip through fractions). Schedules that repeat one already listed for the target are dropped;
    targets no schedule reaches get none.

    ``decays`` adds, for each decay, the decaying schedule with the most GMACs under the target
    (:meth:`SearchSpace.decaying_fit`, ``origin="tome decay=0.85"``): ToMe's matching with a geometrically falling r,
    which on the embedded DINOv2-S loses less than constant r at 2x fewer MACs. ``first_steps`` adds, for each
    decay and step, the same with the first compressible layer merging that many tokens
    (``origin="tome decay=0.85 first=46"``).
    """
    seeds: list[Candidate] = []
    for index, target in enumerate(targets_gmacs):
        schedules: list[tuple[str, tuple[list[int], list[int]] | None]] = []
        for inflect in inflects:
            r = nearest_r(lambda value, inflect=inflect: space.tome_gmacs(value, inflect), target * (1 + 1e-9),
                          space.num_tokens - 1, side="at_most")
            origin = f"tome r={r}" if inflect == 0 else f"tome r={r} inflect={inflect:g}"
            schedules.append((origin, None if r is None else space.tome_kept_lists(r, inflect)))
        for decay in decays:
            for first in [None, *first_steps]:
                origin = f"tome decay={decay:g}" if first is None else f"tome decay={decay:g} first={first}"
                schedules.append((origin, space.decaying_fit(decay, target * (1 + 1e-9), first)))
        seen: set[tuple] = set()
        for origin, kept in schedules:
            if kept is None or (tuple(kept[0]), tuple(kept[1])) in seen:
                continue
            seen.add((tuple(kept[0]), tuple(kept[1])))
            seeds.append(Candidate(tuple(kept[0]), tuple(kept[1]), space.gmacs(*kept), index, "bipartite", origin))
    return seeds


def sample_candidates(space: SearchSpace, targets_gmacs: list[float], count: int, seed: int = 0,
                      canonical: bool = True, shaped: float = 0.75,
                      merge_matches: Sequence[str] = MERGE_MATCHES,
                      tome_inflects: Sequence[float] = (), tome_decays: Sequence[float] = (),
                      tome_first_steps: Sequence[int] = ()) -> list[Candidate]:
    """``count`` candidates spread evenly over the targets, each just under its target's GMACs.

    With ``canonical``, each target's first candidates are :func:`canonical_profiles` (when they fit in the
    count), the rest random: a ``shaped`` fraction from :func:`shaped_profile`, the others from
    :func:`random_profile`. Candidates take the ``merge_matches`` in turn, so every rule gets its share.
    ``tome_inflects``, ``tome_decays`` and ``tome_first_steps`` add ToMe's own schedules and decaying ones
    (:func:`tome_seeds`) first, on top of ``count``; a random draw that repeats one is dropped. Deterministic for a
    seed, so every process of a distributed search draws the same.
    """
    if not 0.0 <= shaped <= 1.0:
        raise ValueError(f"shaped={shaped!r} is invalid: expected a fraction in [0, 1]")
    unknown = [match for match in merge_matches if match not in MERGE_MATCHES]
    if not merge_matches or unknown:
        raise ValueError(f"merge_matches={list(merge_matches)!r} is invalid: expected one or more of "
                         f"{list(MERGE_MATCHES)}")
    rng = random.Random(seed)
    per_target = max(1, count // len(targets_gmacs))
    candidates: list[Candidate] = []
    seen: set[tuple] = set()  # different draws can round to the same counts: evaluate each setting once
    layers, first = space.num_layers, space.first_layer
    for index, target in enumerate(targets_gmacs):
        for seed_candidate in tome_seeds(space, [target], tome_inflects, tome_decays, tome_first_steps):
            if seed_candidate.setting not in seen:
                seen.add(seed_candidate.setting)
                candidates.append(replace(seed_candidate, target=index))
        found, attempts = 0, 0
        if canonical and per_target > 2 * len(canonical_profiles(layers, first)) * len(merge_matches):
            for (profile, share), match in itertools.product(canonical_profiles(layers, first), merge_matches):
                candidate = space.fit(profile, share, target, index, match)
                if candidate is not None and candidate.setting not in seen:
                    seen.add(candidate.setting)
                    candidates.append(replace(candidate, origin="canonical"))
                    found += 1
        while found < per_target and attempts < 50 * per_target:
            attempts += 1
            draw = shaped_profile if rng.random() < shaped else random_profile
            match = merge_matches[attempts % len(merge_matches)]
            candidate = space.fit(*draw(rng, layers, first), target, index, match)
            if candidate is not None and candidate.setting not in seen:
                seen.add(candidate.setting)
                candidates.append(candidate)
                found += 1
        if found == 0:
            steps = space.steps
            # Pruning everything is the smallest configuration of either rule (bipartite merging halves at most).
            lowest = space.gmacs(*space.kept_lists([1.0] * steps, [1.0] * steps, 1.0))
            raise ValueError(f"FLOPs target {target:.4g} GMACs is out of reach: the smallest configuration (keeping "
                             f"{space.min_kept} tokens from layer {first} on) costs {lowest:.4g} GMACs")
    return candidates
