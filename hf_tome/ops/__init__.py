"""Pure tensor operations (matching, merging, pruning) that know nothing of transformers."""

from .matching import Matching, bipartite_soft_matching
from .merging import initial_positions, merge_source, merge_weighted, unmerge
from .pruning import PruneMerge, class_attention, prune_and_merge, rank_by_score, soft_prune_merge

__all__ = ["Matching", "PruneMerge", "bipartite_soft_matching", "class_attention", "initial_positions",
           "merge_source", "merge_weighted", "prune_and_merge", "rank_by_score", "soft_prune_merge", "unmerge"]
