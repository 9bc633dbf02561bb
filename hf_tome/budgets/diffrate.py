"""Differentiable rate search (``hf-tome search --method diffrate``): kept counts learned by gradient descent.

Per layer after the first, two learnable softmaxes choose how many tokens pruning removes and how many merging
removes, among ``0, step, 2*step, ...``. Chaining them gives, for every layer, a distribution over the kept
count; its tail ``P(kept > j)`` is the weight of the token of class-attention rank j (see
:func:`hf_tome.core.ops.soft_prune_merge`), so the task loss is differentiable in the rate logits. The expected
FLOPs follow from the same distributions. Loss = cross-entropy + lambda * ((E[GMACs] - target) / full)^2; only
the rate logits are trained. The learned counts are finally rescaled onto the target exactly like a random
candidate (:meth:`hf_tome.budgets.search_space.SearchSpace.fit`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_tome.budgets.search_eval import CachedEvaluator
from hf_tome.budgets.search_space import Candidate, SearchSpace
from hf_tome.core.plan import ReductionPlan, SoftKept


class RateDistributions(nn.Module):
    """Learnable logits over removal steps for pruning and merging in layers 1..L-1 (the relaxation leaves block 0
    alone, so ``space`` is used as if it protected block 0)."""

    def __init__(self, space: SearchSpace, step: int | None = None, max_fraction: float = 0.25) -> None:
        super().__init__()
        self.space = space = replace(space, protect_block_0=True)
        patches = space.num_tokens - space.shape.protected
        self.step = step or max(1, round(patches / 64))
        options = 1 + math.ceil(max_fraction * patches / self.step)
        self.register_buffer("removals", torch.arange(options) * self.step, persistent=False)
        layers = space.num_layers - 1
        # Start near "remove nothing", so the FLOPs term, not the initialisation, decides where tokens go.
        start = torch.zeros(layers, options)
        start[:, 0] = 3.0
        self.prune_logits = nn.Parameter(start.clone())
        self.merge_logits = nn.Parameter(start.clone())
        total = space.num_tokens + 1
        counts = torch.arange(total)
        # transitions[d, k_new, k_old] = 1 when removing removals[d] tokens from k_old leaves k_new.
        moved = (counts[None, :] - self.removals[:, None]).clamp_min(space.min_kept)
        transitions = torch.zeros(options, total, total)
        transitions.scatter_(1, moved[:, None, :], 1.0)
        self.register_buffer("transitions", transitions, persistent=False)

    def _step(self, distribution: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        weights = logits.softmax(dim=-1)
        return torch.einsum("d,dnk,k->n", weights, self.transitions, distribution)

    def forward(self) -> tuple[list[SoftKept | None], torch.Tensor]:
        """Soft kept weights for every layer (None for block 0) and the expected GMACs per image."""
        space, shape = self.space, self.space.shape
        total = space.num_tokens
        counts = torch.arange(total + 1, dtype=torch.float32, device=self.transitions.device)
        distribution = torch.zeros(total + 1, device=counts.device)
        distribution[total] = 1.0
        channels, hidden = shape.hidden_size, shape.intermediate_size
        fixed = shape.num_patches * shape.patch_macs_per_patch + shape.head_macs
        macs = torch.tensor(float(fixed), device=counts.device)
        macs = macs + 4 * total * channels**2 + 2 * total**2 * channels + 2 * total * channels * hidden
        soft: list[SoftKept | None] = [None]
        for layer in range(space.num_layers - 1):
            entering = distribution
            pruned = self._step(entering, self.prune_logits[layer])
            merged = self._step(pruned, self.merge_logits[layer])
            soft.append(SoftKept(keep=_tail(merged), prune=_tail(pruned),
                                 slots=int(round(float((merged.detach() * counts).sum())))))
            macs = macs + 4 * channels**2 * (entering * counts).sum() + 2 * channels * (entering * counts**2).sum()
            macs = macs + 2 * channels * hidden * (merged * counts).sum()
            distribution = merged
        return soft, macs / 1e9

    def hard_candidate(self, target_gmacs: float) -> Candidate:
        """The most likely removals of every layer, rescaled to land just under ``target_gmacs``."""
        space = self.space
        total = space.num_tokens
        prune_kept, merge_kept, tokens = [total], [total], total
        for layer in range(space.num_layers - 1):
            pruned = max(space.min_kept, tokens - int(self.removals[self.prune_logits[layer].argmax()]))
            merged = max(space.min_kept, pruned - int(self.removals[self.merge_logits[layer].argmax()]))
            prune_kept.append(pruned)
            merge_kept.append(merged)
            tokens = merged
        removed_total = total - merge_kept[-1]
        profile = [(total - kept) / removed_total if removed_total else 1.0 for kept in merge_kept[1:]]
        share = [(entering - pruned) / (entering - merged) if entering > merged else 0.0
                 for entering, pruned, merged in zip(merge_kept[:-1], prune_kept[1:], merge_kept[1:], strict=True)]
        candidate = space.fit(profile, share, target_gmacs)
        if candidate is None:  # the learned shape cannot reach the target: fall back to an even profile
            steps = space.num_layers - 1
            candidate = space.fit([(i + 1) / steps for i in range(steps)], share, target_gmacs)
        if candidate is None:
            raise ValueError(f"FLOPs target {target_gmacs:.4g} GMACs is out of reach for this model")
        return candidate


def _tail(distribution: torch.Tensor) -> torch.Tensor:
    """P(kept > j) for j = 0..N-1 from a distribution over kept counts 0..N."""
    return distribution.flip(0).cumsum(0).flip(0)[1:]


def diffrate_search(evaluator: CachedEvaluator, space: SearchSpace, target_gmacs: float, images: int,
                    steps: int = 100, batch_size: int = 16, lr: float = 0.05, flops_weight: float = 50.0,
                    seed: int = 0) -> tuple[Candidate, list[dict]]:
    """Learn kept counts for ``target_gmacs`` on the first ``images`` search images; returns the candidate and a log.

    Every process trains on its own shard; gradients of the rate logits are averaged over processes.
    """
    accelerator, model = evaluator.accelerator, evaluator.model
    rates = RateDistributions(space).to(accelerator.device)
    optimizer = torch.optim.Adam(rates.parameters(), lr=lr)
    frozen = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    indices = evaluator.local_indices(images)
    evaluator.cache(indices)
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)
    full = space.full_gmacs
    log: list[dict] = []
    try:
        with evaluator.replaying() as replay:
            progress = tqdm(range(steps), desc=f"diffrate {target_gmacs:.3g} GMACs", unit="step",
                            disable=not accelerator.is_main_process)
            for step in progress:
                chosen = torch.randperm(len(indices), generator=generator)[:batch_size].tolist()
                hidden, labels, _ = next(evaluator.batches([indices[i] for i in chosen]))
                hidden = hidden.clone()  # cached under inference_mode: autograd needs a normal tensor
                soft, expected = rates()
                # prop_attn on: the relaxed weights act through log(size) in the attention logits.
                plan = ReductionPlan(layer_r=[0] * space.num_layers, protected=space.shape.protected,
                                     prop_attn=True, soft_kept=soft)
                logits = evaluator.logits_from_block0(replay, hidden, plan).float()
                task = nn.functional.cross_entropy(logits, labels)
                loss = task + flops_weight * ((expected - target_gmacs) / full) ** 2
                optimizer.zero_grad()
                loss.backward()
                if accelerator.num_processes > 1:
                    for parameter in rates.parameters():
                        parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
                optimizer.step()
                task_value, gmacs_value = float(task.detach()), float(expected.detach())
                log.append({"step": step, "task_loss": task_value, "expected_gmacs": gmacs_value})
                progress.set_postfix(loss=f"{task_value:.3f}", gmacs=f"{gmacs_value:.3f}")
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    return rates.hard_candidate(target_gmacs), log
