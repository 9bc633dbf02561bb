"""The published DC-ViT fine-tuning recipe in iterations, and fitting it to a time budget.

Recipe (arXiv 2403.18708): about 2,000 iterations of batch 64 after every compressed block, AdamW at 3e-5 with a
cosine schedule after a 20-epoch warm-up, weight decay 1e-4, colour-jitter augmentation. ``--budget-minutes``
measures the cost of a step at start and scales every phase's iterations by one factor so the estimate fits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

RECIPE_ITERATIONS_PER_BLOCK = 2000
RECIPE_BATCH_SIZE = 64
RECIPE_LR = 3e-5
RECIPE_WEIGHT_DECAY = 1e-4
RECIPE_WARMUP_EPOCHS = 20
RECIPE_AUGMENT = "color-jitter"
# Not part of the published recipe (our choices): no final phase, short block-trial fine-tunes, 8 pool copies.
DEFAULT_FINAL_ITERATIONS = 0
DEFAULT_TRIAL_ITERATIONS = 100
DEFAULT_POOL_COPIES = 8
WARMUP_MAX_FRACTION = 0.1  # the default warm-up never takes more than this share of a phase


def epochs_to_iterations(epochs: float, num_images: int, batch_size: int) -> int:
    """Iterations of ``epochs`` passes over ``num_images`` images in batches of ``batch_size`` (the old options;
    a last partial batch is dropped when there are more images than one batch)."""
    per_epoch = max(1, num_images // batch_size) if num_images > batch_size else 1
    return max(1, round(epochs * per_epoch))


def warmup_iterations(iterations: int, num_images: int, batch_size: int, requested: int | None = None) -> int:
    """Warm-up steps of a phase of ``iterations``: ``requested`` (at most the phase), else the recipe's 20 epochs
    of the images, at most ``WARMUP_MAX_FRACTION`` of the phase."""
    if requested is not None:
        return max(0, min(requested, iterations))
    epochs = RECIPE_WARMUP_EPOCHS * math.ceil(num_images / batch_size)
    return min(epochs, int(WARMUP_MAX_FRACTION * iterations))


@dataclass(frozen=True)
class TrainingPlan:
    """Iterations of each phase: after every compressed block, once at the end, and per block-trial candidate."""

    per_block: int
    final: int
    trial: int
    num_blocks: int
    num_candidates: int
    estimate_seconds: float | None = None
    scale: float = 1.0

    def describe(self) -> str:
        """One line for the log: the planned iterations and, when measured, the time estimate."""
        text = (f"training plan: {self.per_block} iterations per block x {self.num_blocks} blocks, {self.final} "
                f"final, {self.trial} per trial x {self.num_candidates} candidates")
        if self.scale != 1.0:
            text += f" (recipe scaled by {self.scale:.3f} to the budget)"
        if self.estimate_seconds is not None:
            text += f"; estimate {self.estimate_seconds / 60:.1f} min"
        return text


@dataclass(frozen=True)
class StepCosts:
    """Measured seconds: one fine-tuning step after a compressed block (and in the final phase), one block-trial
    step, and the work that does not scale with the iterations (teacher pool, caches, scoring)."""

    step: float
    trial_step: float
    fixed: float = 0.0

    def estimate(self, plan: TrainingPlan) -> float:
        """Seconds ``plan`` should take."""
        return (self.fixed + self.step * (plan.per_block * plan.num_blocks + plan.final)
                + self.trial_step * plan.trial * plan.num_candidates)


def fit_to_budget(plan: TrainingPlan, costs: StepCosts, budget_seconds: float) -> TrainingPlan:
    """``plan`` with every phase's iterations scaled by one factor (never above the plan, at least 1 where the
    plan had any) so that ``costs.estimate`` fits ``budget_seconds``; the estimate is recorded."""
    variable = costs.estimate(plan) - costs.fixed
    scale = 1.0 if variable <= 0 else min(1.0, max(0.0, budget_seconds - costs.fixed) / variable)

    def scaled(iterations: int) -> int:
        return 0 if iterations == 0 else max(1, math.floor(iterations * scale))

    fitted = replace(plan, per_block=scaled(plan.per_block), final=scaled(plan.final), trial=scaled(plan.trial),
                     scale=scale)
    return replace(fitted, estimate_seconds=costs.estimate(fitted))


def measure_seconds(run: Callable[[], object], repeats: int = 3, warmup: int = 1,
                    clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of ``run()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return sorted(times)[len(times) // 2]
