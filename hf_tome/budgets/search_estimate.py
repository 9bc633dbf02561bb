"""How long ``hf-tome search``'s staged random search (successive halving by default) will take, said before it
starts.

:func:`stage_quota` is the survival rule of :func:`hf_tome.budgets.search.staged_random_search`; it lives here so
that the estimate counts exactly the candidates the search keeps without importing the search.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from hf_tome.budgets.search_space import Candidate


def stage_quota(members: int, keep: float, last: bool) -> int:
    """How many of a bucket's ``members`` candidates survive a stage: its best one after the last stage, else
    the best ``keep`` fraction, at least 2 (never more than there are)."""
    return min(members, 1 if last else max(2, math.ceil(keep * members)))


@dataclass(frozen=True)
class SearchEstimate:
    """The forward passes :func:`staged_random_search` will run and how long they should take.

    ``stages`` holds, per stage, the candidates it evaluates, the images each one runs on (this process's share)
    and the forward passes that takes per candidate. ``reference_passes`` are the uncompressed model's passes
    of the stages before the last (their KL reference, once per image).
    """

    stages: tuple[tuple[int, int, int], ...]
    reference_passes: int
    batch_size: int
    seconds_per_image: float
    seconds: float

    @property
    def passes(self) -> int:
        """Forward passes in all (candidates and references)."""
        return sum(candidates * passes for candidates, _, passes in self.stages) + self.reference_passes

    def message(self, device: str, processes: int = 1) -> str:
        """One line for the log, e.g. ``estimated search time: ~2.8 h (15,604 forward passes ...)``."""
        first, *rest = self.stages
        parts = [f"{first[0]:,} candidates x {first[2]:,} pass{'es' if first[2] != 1 else ''} ({first[1]:,} images)"]
        parts += [f"{candidates:,} x {passes:,} ({images:,} images)" for candidates, images, passes in rest]
        if self.reference_passes:
            parts.append(f"and {self.reference_passes:,} uncompressed reference pass"
                         f"{'es' if self.reference_passes != 1 else ''}")
        where = f"{device} x {processes} processes" if processes > 1 else device
        return (f"estimated search time: {format_duration(self.seconds)} ({self.passes:,} forward passes of up to "
                f"{self.batch_size} images on {where}: {', '.join(parts)}; "
                f"{self.seconds_per_image * self.batch_size:.3g} s per pass of {self.batch_size} images, measured); "
                f"use --candidates N to shorten")


def estimate_search(bucket_sizes: Sequence[int], stage_images: Sequence[int], keep: float, batch_size: int,
                    seconds_per_image: float, late_sizes: Sequence[int] = ()) -> SearchEstimate:
    """The passes and seconds of :func:`staged_random_search` on buckets of ``bucket_sizes`` candidates, plus
    ``late_sizes`` (ToMe seeds) per bucket that join the last stage only.

    Stage ``k`` runs every surviving candidate on ``stage_images[k]`` images (this process's share) in passes of
    up to ``batch_size``, then keeps :func:`stage_quota` of every bucket. The stages before the last also run
    the uncompressed model once on the images no earlier stage referenced (the stages' images are taken to grow
    as prefixes, as they do in one process). The seconds are the images run through the model times
    ``seconds_per_image``, measured on the candidates (block 0 replayed); caching block 0 (one block per image,
    once) is left out.
    """
    sizes, stages, reference_passes, images_run, referenced = list(bucket_sizes), [], 0, 0, 0
    for number, images in enumerate(stage_images):
        last = number == len(stage_images) - 1
        evaluated = sum(sizes) + (sum(late_sizes) if last else 0)
        stages.append((evaluated, images, math.ceil(images / batch_size)))
        images_run += evaluated * images
        if not last and images > referenced:
            reference_passes += math.ceil((images - referenced) / batch_size)
            images_run += images - referenced
            referenced = images
        sizes = [stage_quota(size, keep, last) for size in sizes]
    return SearchEstimate(tuple(stages), reference_passes, batch_size, seconds_per_image,
                          images_run * seconds_per_image)


def format_duration(seconds: float) -> str:
    """``~45 s``, ``~12 min`` or ``~2.3 h``."""
    if seconds < 1:
        return "<1 s"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def measure_search_estimate(evaluator, candidates: list[Candidate], stage_images: list[int],
                            keep: float) -> SearchEstimate:
    """:func:`estimate_search` with the seconds per image measured on this machine: one pass of a batch of the
    search images for the first candidate of every bucket (after a warm-up pass). ToMe seeds
    (``Candidate.is_tome_seed``) are counted in the last stage only, as the search runs them."""
    targets = sorted({candidate.target for candidate in candidates})
    buckets = Counter(candidate.target for candidate in candidates if not candidate.is_tome_seed)
    seeds = Counter(candidate.target for candidate in candidates if candidate.is_tome_seed)
    first = {}
    for candidate in sorted(candidates, key=lambda candidate: candidate.is_tome_seed):  # random ones first
        first.setdefault(candidate.target, candidate)
    seconds_per_image = evaluator.seconds_per_image([first[target].setting for target in targets],
                                                    max(stage_images))
    local_images = [len(evaluator.local_indices(count)) for count in stage_images]
    return estimate_search([buckets[target] for target in targets], local_images, keep, evaluator.batch_size,
                           seconds_per_image, [seeds[target] for target in targets])
