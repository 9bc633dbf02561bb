"""Pure tensor operations (matching, merging, pruning) that know nothing of transformers."""

from hf_tome.core.ops.agglomerative import agglomerative_matching
from hf_tome.core.ops.matching import Matching, bipartite_soft_matching
from hf_tome.core.ops.merging import initial_positions, merge_source, merge_weighted, mlerp_rescale, unmerge
from hf_tome.core.ops.pitome import energy_scores, pitome_margin, pitome_matching
from hf_tome.core.ops.pruning import PruneMerge, class_attention, prune_and_merge, rank_by_score, soft_prune_merge

__all__ = ["Matching", "PruneMerge", "agglomerative_matching", "bipartite_soft_matching", "class_attention",
           "energy_scores", "initial_positions", "merge_source", "merge_weighted", "mlerp_rescale", "pitome_margin",
           "pitome_matching", "prune_and_merge", "rank_by_score", "soft_prune_merge", "unmerge"]
