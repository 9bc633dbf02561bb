"""The candidate distribution of the random rate search (pure Python, no model)."""

import random

import pytest

from hf_tome.budgets.search_space import SearchSpace, random_profile, sample_candidates, shaped_profile
from hf_tome.core.macs import EncoderShape

# DINOv2-S at 224 px with a 10-class head: 256 patches + the class token, 6.124 GMACs uncompressed.
DINOV2_S = EncoderShape(hidden_size=384, intermediate_size=1536, num_layers=12, num_patches=256, protected=1,
                        patch_macs_per_patch=384 * 3 * 14 * 14, head_macs=768 * 10)


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.for_shape(DINOV2_S)


def test_full_macs_of_the_dinov2_s_shape(space):
    assert space.full_gmacs == pytest.approx(6.1236, abs=1e-4)
    assert space.min_kept == 1 + 13


@pytest.mark.parametrize("draw", [shaped_profile, random_profile])
def test_profiles_are_cumulative_and_shares_are_fractions(draw):
    rng = random.Random(3)
    for _ in range(200):
        profile, share = draw(rng, 12)
        assert len(profile) == len(share) == 11
        assert all(0.0 <= a <= b <= 1.0 for a, b in zip(profile, profile[1:], strict=False))
        assert profile[-1] == pytest.approx(1.0)
        assert all(0.0 <= s <= 1.0 for s in share)


def test_shaped_shares_are_small_and_half_merge_only():
    rng = random.Random(0)
    draws = [shaped_profile(rng, 12) for _ in range(2000)]
    merge_only = sum(all(s == 0.0 for s in share) for _, share in draws)
    assert 900 <= merge_only <= 1100
    assert max(max(share) for _, share in draws) <= 0.3 + 5 * 0.05  # mix <= 0.3 plus a 5-sigma jitter
    # Late starts: about 30% of the profiles remove nothing in layer 1.
    late = sum(profile[0] == 0.0 for profile, _ in draws)
    assert 450 <= late <= 750


@pytest.mark.parametrize("protect_block_0", [False, True])
def test_candidates_land_in_a_narrow_band_under_each_target(protect_block_0):
    space = SearchSpace.for_shape(DINOV2_S, protect_block_0=protect_block_0)
    targets = [0.7 * space.full_gmacs, 0.55 * space.full_gmacs]
    candidates = sample_candidates(space, targets, 400, seed=0)
    assert len(candidates) == 400 and [c.target for c in candidates].count(0) == 200
    assert len({c.setting for c in candidates}) == 400  # no evaluation wasted on repeats
    assert {c.merge_match for c in candidates} == {"class_attention", "bipartite"}
    for candidate in candidates:
        target = targets[candidate.target]
        assert 0.995 * target <= candidate.gmacs <= target
        assert candidate.gmacs == pytest.approx(space.gmacs(candidate.prune_kept, candidate.merge_kept))
        if protect_block_0:  # the spec's rule: block 0 keeps every token
            assert candidate.prune_kept[0] == candidate.merge_kept[0] == 257
        else:
            assert candidate.prune_kept[0] <= 257
        kept = [min(p, m) for p, m in zip(candidate.prune_kept, candidate.merge_kept, strict=True)]
        assert all(a >= b for a, b in zip(candidate.merge_kept, candidate.merge_kept[1:], strict=False))
        assert all(p >= m for p, m in zip(candidate.prune_kept, candidate.merge_kept, strict=True))
        # No layer keeps more tokens than enter it (hf_tome.apply refuses that).
        assert all(p <= m for p, m in zip(candidate.prune_kept[1:], candidate.merge_kept, strict=False))
        assert min(kept) >= space.min_kept
    compressing_block_0 = sum(c.merge_kept[0] < 257 for c in candidates)
    assert compressing_block_0 == 0 if protect_block_0 else compressing_block_0 > 200


def test_shaped_fraction_changes_the_mix(space):
    targets = [0.7 * space.full_gmacs]

    def pruning_fraction(shaped: float) -> float:
        candidates = sample_candidates(space, targets, 300, seed=1, canonical=False, shaped=shaped)
        removed = sum(c.merge_kept[0] - c.merge_kept[-1] for c in candidates)
        pruned = sum(entering - p for c in candidates
                     for entering, p in zip(c.merge_kept[:-1], c.prune_kept[1:], strict=True))
        return pruned / removed

    # Uniform shares prune about half of what is removed; shaped candidates prune a small part of it.
    assert pruning_fraction(0.0) > 0.35
    assert pruning_fraction(1.0) < 0.1


def test_bad_shaped_fraction_raises(space):
    with pytest.raises(ValueError, match=r"shaped=1.5 is invalid: expected a fraction in \[0, 1\]"):
        sample_candidates(space, [0.7 * space.full_gmacs], 10, shaped=1.5)
